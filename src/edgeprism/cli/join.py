"""`edgeprism join ADDR:PORT`: make this machine a device of a coordinator's cluster, and
`edgeprism cluster status ADDR:PORT`: who is in it."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

from edgeprism.comm.auth import SECRET_FILE_ENV, AuthError, load_secret
from edgeprism.comm.context import parse_cores
from edgeprism.runtime.coordinator import Device, DeviceOptions, parse_address, read_status
from edgeprism.testbed.emulation import EmulatedLink


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "join", help="join a coordinator's cluster as a device and serve its plans until Ctrl-C",
        description="Connect to the coordinator started with `edgeprism serve --listen ADDR:PORT`, prove this device "
                    "holds the cluster secret, load the same model (and weights, with --checkpoint) and profile, and "
                    "serve the coordinator's distributed requests. The coordinator assigns the rank, checks the model, "
                    "weights and profile digests, and takes the device in between two requests. Ctrl-C leaves "
                    "cleanly; a lost coordinator is joined again with backoff. docs/DEPLOY.md")
    p.add_argument("address", metavar="ADDR:PORT", help="the coordinator's --listen address")
    p.add_argument("--secret-file", metavar="FILE",
                   help=f"the cluster secret, the same file as the coordinator's (default: ${SECRET_FILE_ENV})")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="this device's copy of the coordinator's checkpoint folder (needed when it serves one)")
    p.add_argument("--device", default="cpu", help="torch device for the model, e.g. cuda (default cpu)")
    p.add_argument("--cores", default="", metavar="LIST", help="pin to these CPU cores, e.g. 0-3 (default: all)")
    p.add_argument("--bind", metavar="ADDR",
                   help="address this device's data lanes listen on (default: its interface towards the coordinator)")
    p.add_argument("--rank", type=int, default=0, help="ask for this rank (default 0: any free rank)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the coordinator (default 60)")
    p.add_argument("--no-retry", action="store_true",
                   help="exit when the coordinator goes away or ends the session instead of joining again")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(handler=handle)

    c = subparsers.add_parser("cluster", help="who is in a coordinator's cluster (`cluster status ADDR:PORT`)",
                              description="Read the coordinator's cluster status (members, devices, speeds, link "
                                          "estimate, last errors), checked with the cluster secret.")
    c.add_argument("action", choices=["status"])
    c.add_argument("address", metavar="ADDR:PORT")
    c.add_argument("--secret-file", metavar="FILE", help=f"the cluster secret (default: ${SECRET_FILE_ENV})")
    c.add_argument("--json", action="store_true", help="the status as JSON")
    c.add_argument("--timeout", type=float, default=10.0)
    c.set_defaults(handler=handle_status)


def _secret(path: str | None) -> bytes | None:
    environ = {SECRET_FILE_ENV: path} if path else os.environ
    secret = load_secret(environ)
    if secret is None:
        raise ValueError(f"no cluster secret: give --secret-file FILE (the coordinator's) or set {SECRET_FILE_ENV}")
    return secret


def handle(args) -> int:
    if args.timeout <= 0:
        raise ValueError(f"--timeout {args.timeout} must be > 0")
    if args.rank < 0:
        raise ValueError(f"--rank {args.rank} must be >= 0 (0: any free rank)")
    if args.checkpoint and not os.path.isdir(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint} is not a folder")
    parse_address(args.address)  # a malformed address is named before anything else
    secret = _secret(args.secret_file)
    options = DeviceOptions(address=args.address, checkpoint=args.checkpoint, device=args.device,
                            cores=parse_cores(args.cores), rank=args.rank, bind_addr=args.bind,
                            connect_timeout_s=args.timeout, retry=not args.no_retry)
    link = EmulatedLink.from_env(os.environ)  # the testbed's emulated link, when this device runs on one

    def say(text: str) -> None:
        if not args.quiet:
            print(f"edgeprism join: {text}", file=sys.stderr, flush=True)

    say(f"connecting to {args.address} ...")
    device = Device(options, secret, link=link, on_event=say)
    outcome: dict = {}

    def serve() -> None:
        try:
            outcome["served"] = device.run()
        except BaseException as err:  # re-raised on the main thread, which alone receives Ctrl-C
            outcome["error"] = err

    # SIGTERM (systemd stop) leaves as cleanly as Ctrl-C does; SIGINT is handled even where the shell started
    # us in the background with it ignored (`edgeprism join ... &` in a script).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)
    thread = threading.Thread(target=serve, name="edgeprism-device", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        device.leave()
        sys.stderr.flush()
        os._exit(0)  # the serving thread may sit in a C++ wait; nothing of it needs finishing
    error = outcome.get("error")
    if isinstance(error, AuthError):
        print(f"edgeprism join: refused: {error}", file=sys.stderr, flush=True)
        return 3
    if error is not None:
        raise error
    say(f"done after {outcome['served']} distributed requests")
    return 0


def handle_status(args) -> int:
    status = read_status(args.address, _secret(args.secret_file), args.timeout)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    link = status["link"]
    print(f"{status['model']} at {args.address}: epoch {status['epoch']}, serving ranks {status['members']} of "
          f"{status['world_size']}; link {link['bandwidth_bps'] / 1e6:.1f} Mbit/s, {link['latency_s'] * 1e3:.2f} ms; "
          f"{status['requests']} requests, {status['failures']} rerun on rank 0")
    for entry in status["ranks"]:
        speed = f"{entry['speed']:.2f}" if entry.get("speed") is not None else "?"
        where = " ".join(f"{k}={entry[k]}" for k in ("host", "device", "cores") if entry.get(k) not in (None, []))
        print(f"  rank {entry['rank']}: {entry['state']:<8} speed {speed}  {where}")
    for event in status["last_errors"]:
        print(f"  last: {event['what']}")
    return 0
