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
from edgeprism.runtime.coordinator import ClusterSpec, Device, DeviceOptions, parse_address, read_status
from edgeprism.runtime.succession import Succession, Successor, parse_coordinators, sweep
from edgeprism.testbed.emulation import LINK_FILE_ENV, EmulatedLink


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "join", help="join a coordinator's cluster as a device and serve its plans until Ctrl-C",
        description="Connect to the coordinator started with `edgeprism serve --listen ADDR:PORT`, prove this device "
                    "holds the cluster secret, load the same model (and weights, with --checkpoint) and profile, and "
                    "serve the coordinator's distributed requests. The coordinator assigns the rank, checks the model, "
                    "weights and profile digests, and takes the device in between two requests. Ctrl-C leaves "
                    "cleanly; a lost coordinator is joined again with backoff. docs/DEPLOY.md")
    p.add_argument("address", metavar="ADDR:PORT", nargs="?",
                   help="the coordinator's --listen address (or give --coordinators)")
    p.add_argument("--coordinators", metavar="A:P,B:P,...",
                   help="the succession list, the same on every machine: join the first address that serves, and "
                        "take over at --listen when every earlier one is gone (docs/DEPLOY.md, failover)")
    p.add_argument("--listen", metavar="ADDR:PORT",
                   help="with --coordinators: this device's own entry of the list, where it serves when promoted")
    p.add_argument("--http", metavar="ADDR:PORT",
                   help="with --coordinators: where a promoted device serves the HTTP API (default: the --listen "
                        "host and the coordinator's --port)")
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
    c.add_argument("address", metavar="ADDR:PORT",
                   help="the coordinator; or a succession list A:P,B:P,... (the status of whichever serves)")
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
    succession = _succession(args)
    address = args.address or (succession.addresses[0] if succession else None)
    if address is None:
        raise ValueError("give the coordinator's ADDR:PORT, or --coordinators A:P,B:P,... with --listen")
    parse_address(address)  # a malformed address is named before anything else
    secret = _secret(args.secret_file)
    options = DeviceOptions(address=address, checkpoint=args.checkpoint, device=args.device,
                            cores=parse_cores(args.cores), rank=args.rank, bind_addr=args.bind,
                            connect_timeout_s=args.timeout, retry=not args.no_retry)
    link = EmulatedLink.from_env(os.environ)  # the testbed's emulated link, when this device runs on one

    def say(text: str) -> None:
        if not args.quiet:
            print(f"edgeprism join: {text}", file=sys.stderr, flush=True)

    if succession is not None:
        secret_file = args.secret_file or os.environ.get(SECRET_FILE_ENV)
        if not secret_file:  # a promoted device serves with the same file (a fresh secret would lock all out)
            raise ValueError(f"--coordinators needs the secret as a file: --secret-file FILE or ${SECRET_FILE_ENV}")
        say(f"looking for the coordinator among {','.join(succession.others)} ...")
        successor = Successor(succession, options, secret, secret_file, link=link, on_event=say,
                              link_file=os.environ.get(LINK_FILE_ENV) or None,
                              serve=lambda engine, spec, stop: serve_promoted(engine, spec, stop, succession.own,
                                                                              args.http, args.checkpoint, say))
        return run_until_stopped(successor, say)
    say(f"connecting to {address} ...")
    return run_until_stopped(Device(options, secret, link=link, on_event=say), say)


def _succession(args) -> Succession | None:
    if not args.coordinators:
        if args.listen or args.http:
            raise ValueError("--listen and --http are for --coordinators (a device that may take over)")
        return None
    if args.no_retry or args.rank:
        raise ValueError(f"--coordinators walks the list for good: it takes neither --no-retry nor --rank "
                         f"{args.rank}")
    if not args.listen:
        raise ValueError(f"--coordinators {args.coordinators} needs --listen ADDR:PORT, this device's own entry")
    if args.http:
        parse_address(args.http)
    return Succession(parse_coordinators(args.coordinators), args.listen.strip())


def serve_promoted(engine, spec: ClusterSpec, stop: threading.Event, own: str, http: str | None,
                   checkpoint: str | None, say) -> None:
    """What a promoted device serves until `stop`: the HTTP API when the cluster served one (the spec's
    `service`), at `http` or the --listen host and the coordinator's port; else the store alone."""
    service = spec.service
    if service is None or service.get("http_port") is None:
        say(f"coordinating at {own} (the cluster served no HTTP API)")
        stop.wait()
        return
    from edgeprism.api import ApiConfig, serve_http
    from edgeprism.api.auth import HttpAccess
    from edgeprism.inputs import load_io

    host, port = parse_address(http) if http else (parse_address(own)[0], int(service["http_port"]))
    try:
        io = load_io(engine.model.config, checkpoint)
    except ValueError as err:  # e.g. a random-weight text preset has no tokenizer: tensors only
        say(f"only POST /infer (tensor requests) is served: {err}")
        io = None
    config = ApiConfig(model_name=service.get("served_model_name"), dynamic_batching=service["dynamic_batching"],
                       batch_window_s=service["batch_window_s"], outputs_mode=service["outputs"],
                       guard_margin=service.get("guard_margin"))
    access = HttpAccess.from_service(service.get("access"))  # the same key / TLS file paths, read on this machine
    scheme = "https" if access.tls else "http"
    serve_http(engine, io, host, port, config, stop=stop, access=access,
               on_ready=lambda h, p: say(f"listening on {scheme}://{h}:{p} as the coordinator"))


def run_until_stopped(runner: Device | Successor, say) -> int:
    """Run `runner` on a thread of its own until it ends or Ctrl-C / SIGTERM (then leave and exit)."""
    outcome: dict = {}

    def serve() -> None:
        try:
            outcome["served"] = runner.run()
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
        runner.leave()
        sys.stderr.flush()
        os._exit(0)  # the serving thread may sit in a C++ wait; nothing of it needs finishing
    error = outcome.get("error")
    if isinstance(error, AuthError):
        print(f"edgeprism join: refused: {error}", file=sys.stderr, flush=True)
        return 3
    if error is not None:
        raise error
    if outcome.get("served") is not None:
        say(f"done after {outcome['served']} distributed requests")
    return 0


def handle_status(args) -> int:
    secret = _secret(args.secret_file)
    if "," in args.address:  # a succession list: the earliest address that serves is the coordinator
        found = sweep(parse_coordinators(args.address), secret, min(args.timeout, 2.0))
        if found is None:
            raise ValueError(f"no address of {args.address} serves this cluster (down, or another secret)")
        args.address = found[0]
    status = read_status(args.address, secret, args.timeout)
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
