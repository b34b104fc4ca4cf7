"""`edgeprism serve`: an engine over N local workers, answering JSON requests from a file, stdin or HTTP."""

from __future__ import annotations

import json
import logging
import sys

from edgeprism.cli.budget import add_budget_arguments
from edgeprism.cli.model_arg import CHECKPOINT_HELP, MODEL_HELP

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve requests, planning each one (local or distributed) from the profile and the live link",
        description="Start an engine (this process is rank 0, N-1 workers pinned to their own cores) and answer "
                    "JSON requests, one per line from --input, or POSTed to /infer with --http. Each answer is one "
                    "JSON line on stdout; a bad request gets {\"id\": ..., \"error\": ...} and serving goes on. "
                    "Request format: see edgeprism.runtime.requests.")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights when there is no checkpoint")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--profile", metavar="FILE", help="profile JSON written by `edgeprism profile` (with --listen "
                                                          "and no profile: the devices are profiled first)")
    source.add_argument("--synthetic-profile", action="store_true",
                        help="plan from a synthetic profile for --model (realistic numbers, not measured)")
    p.add_argument("--world-size", type=int, default=2, help="ranks (devices), rank 0 included; default 2")
    p.add_argument("--listen", metavar="ADDR:PORT",
                   help="be the coordinator of real devices: serve the rendezvous store on ADDR:PORT and let devices "
                        "join it (`edgeprism join ADDR:PORT`); no local workers are started. Needs --secret-file "
                        "off-loopback. docs/DEPLOY.md")
    p.add_argument("--store-allow", metavar="ADDR,NET/N,...",
                   help="with --listen: only these IPv4 addresses or networks (the devices'; this host and the "
                        "--coordinators are added) reach the rendezvous store; the kernel drops everyone else's "
                        "packets (Linux; docs/SECURITY.md). Default: every address")
    p.add_argument("--coordinators", metavar="A:P,B:P,...",
                   help="with --listen and --http: the succession list (--listen is one of them), the same on every "
                        "machine: devices given it take over when this coordinator dies, and this one joins a "
                        "coordinator that already serves instead of starting a second cluster (docs/DEPLOY.md)")
    p.add_argument("--objective", choices=["latency", "energy", "edp"], default="latency")
    add_budget_arguments(p)
    p.add_argument("--max-latency", type=float, metavar="SECONDS", help="latency ceiling for the planner")
    p.add_argument("--max-batch", type=int, default=32, help="refuse requests with more rows (default 32)")
    p.add_argument("--fixed-link", action="store_true",
                   help="plan by the profile's link alone (default: re-estimate the link from every distributed "
                        "request and from probes)")
    p.add_argument("--seal-lanes", choices=("auto", "on", "off"), default="auto",
                   help="seal every data-lane message with ChaCha20-Poly1305 (default auto: on unless the lanes "
                        "listen on loopback; docs/SECURITY.md)")
    p.add_argument("--learn-compute", action="store_true",
                   help="re-estimate local vs distributed compute online (default: plan by the profile's compute)")
    inputs = p.add_mutually_exclusive_group()
    inputs.add_argument("--input", default="-", metavar="FILE",
                        help="requests, one JSON object per line; '-' (default) reads stdin")
    inputs.add_argument(
        "--http",
        action="store_true",
        help="serve the HTTP API instead: OpenAI-style /v1/embeddings and /v1/completions, /v1/classify "
        "for images, /infer for tensor requests, /metrics, /health, /v1/cluster (docs/API.md)",
    )
    p.add_argument("--no-batching", action="store_true",
                   help="--http: one engine call per request (default: concurrent requests are batched)")
    p.add_argument("--batch-window-ms", type=float, default=5.0, metavar="MS",
                   help="--http: how long a request waits for others to batch with (default 5 ms)")
    p.add_argument("--guard-margin", type=float, default=None, metavar="P",
                   help="--http: labelled rows a reduced-precision split answered with a top-2 score margin under P "
                        "are rerun on one device (default: 1.5 x the codec's label shift in the profile, 0.05 where "
                        "unmeasured; 0: off; docs/API.md, the near-tie guard)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="--http: the model name clients send (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="--http address (default 127.0.0.1, this machine only; another "
                                                       "address needs --api-key-file or --http-insecure)")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="--http: every request but /health must carry `Authorization: Bearer <key>` with the key in "
                        "FILE (>= 16 characters: `openssl rand -hex 32 > api.key`); docs/API.md")
    p.add_argument("--metrics-open", action="store_true", help="--http: serve /metrics without the API key")
    p.add_argument("--tls-cert", metavar="FILE", help="--http: serve HTTPS with this PEM certificate (with --tls-key)")
    p.add_argument("--tls-key", metavar="FILE", help="--http: the PEM private key of --tls-cert")
    p.add_argument("--http-insecure", action="store_true",
                   help="--http: allow serving off loopback without an API key (on purpose, e.g. behind a proxy "
                        "that authenticates)")
    p.add_argument("--port", type=int, default=8000, help="--http port (default 8000; 0 picks a free one)")
    p.add_argument("--outputs", choices=["summary", "full", "none"], default="summary",
                   help="summary: output shapes and logits argmax; full: every value")
    p.add_argument("--cores-per-worker", type=int, default=1)
    p.add_argument("--cores", default="", metavar="LIST",
                   help="pin this process (rank 0) to these CPU cores and use that many threads, e.g. 0 or 0-3 "
                        "(default: all cores); what `edgeprism join --cores` does on a device")
    p.add_argument("--link-file", metavar="FILE",
                   help="emulated link file every rank follows (edgeprism.testbed; rewrite it to change the link)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds the workers have to connect to the store")
    p.add_argument("--secret-file", metavar="FILE",
                   help="cluster secret (>= 16 bytes, mode 600) the workers must prove they hold; default: a fresh "
                        "random one. Give one to start replacement workers by hand (docs/RELIABILITY.md)")
    p.add_argument("--stall-factor", type=float, default=5.0,
                   help="a distributed request is rerun on rank 0 after max(--min-stall, this x its predicted "
                        "latency) (default 5)")
    p.add_argument("--min-stall", type=float, default=2.0, metavar="SECONDS",
                   help="the shortest such stall (default 2 s)")
    p.set_defaults(handler=handle)


def _profile(args, listen=None):
    from edgeprism.models.loading import model_config
    from edgeprism.plan.synthetic import synthetic_profile
    from edgeprism.profile.schema import Profile
    from edgeprism.runtime.cluster_profile import profile_for_serving

    if not args.profile and not args.synthetic_profile:
        if listen is None:
            raise ValueError("give --profile FILE or --synthetic-profile (or --listen ADDR:PORT: profile the devices)")
        return profile_for_serving(listen, args.world_size, args.secret_file, args.model, args.checkpoint, args.seed,
                                   say=lambda text: print(f"edgeprism serve: {text}", file=sys.stderr, flush=True))

    if args.synthetic_profile:
        log.warning("planning from a synthetic profile for %s: its numbers are not measured on this machine",
                    args.model)
        return synthetic_profile(model_config(args.model, args.checkpoint), world_size=args.world_size)
    return Profile.load(args.profile, expect_world_size=args.world_size)


def handle(args) -> int:
    from edgeprism.runtime.cluster import launch_engine
    from edgeprism.runtime.engine import EngineConfig
    from edgeprism.runtime.serving import serve_lines

    if args.world_size < 1:
        raise ValueError(f"--world-size {args.world_size} must be >= 1")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} must be in 0..65535")
    config = EngineConfig(objective=args.objective, max_fidelity_loss=args.max_fidelity_loss,
                          allow_unmeasured_codecs=args.allow_unmeasured_codecs,
                          max_latency_s=args.max_latency, max_batch=args.max_batch, stall_factor=args.stall_factor,
                          min_stall_s=args.min_stall, learn_compute=args.learn_compute,
                          learn_link=not args.fixed_link, seal_lanes=args.seal_lanes)
    if args.guard_margin is not None and not 0 <= args.guard_margin < 1:
        raise ValueError(f"--guard-margin {args.guard_margin} must be in [0, 1): a difference of two label "
                         f"probabilities (0 turns the near-tie guard off)")
    access = _access(args)
    if args.secret_file:
        from edgeprism.comm.auth import SECRET_FILE_ENV, load_secret

        load_secret({SECRET_FILE_ENV: args.secret_file})  # a bad secret file is the user's error, named now
    listen = _listen(args)
    if args.coordinators and not (listen and args.http and (args.profile or args.synthetic_profile) and args.port):
        raise ValueError(f"--coordinators {args.coordinators} needs --listen (this machine's entry), --http with a "
                         f"fixed --port (clients retry that port at the next address; got {args.port}) and --profile "
                         f"or --synthetic-profile")
    if args.cores:
        from edgeprism.comm.context import parse_cores, pin_cpu

        pin_cpu(parse_cores(args.cores))
    profile = _profile(args, listen)
    if args.coordinators:
        return _serve_succession(args, config, profile, access)
    stream = None if args.http else sys.stdin if args.input == "-" else _open(args.input)
    if listen:
        print(f"edgeprism serve: coordinator of {args.model} for {args.world_size - 1} device(s); devices join with "
              f"`edgeprism join {args.listen} --secret-file {args.secret_file or 'FILE'}`", file=sys.stderr, flush=True)
    else:
        print(f"edgeprism serve: starting {args.model} over {args.world_size} rank(s) ...", file=sys.stderr,
              flush=True)

    def write(reply: dict) -> None:
        print(json.dumps(reply), flush=True)
        if args.http and "metrics" not in reply and "error" not in reply:
            return
        if "error" in reply:
            print(f"edgeprism serve: request {reply['id']}: error: {reply['error']}", file=sys.stderr, flush=True)
        else:
            m = reply["metrics"]
            how = m["mode"] if m["mode"] == "local" else f"{m['plan']['codec']} over ranks {m['plan']['ranks']}"
            print(f"edgeprism serve: request {reply['id']}: {how}, {m['latency_s'] * 1e3:.1f} ms (predicted "
                  f"{m['predicted_latency_s'] * 1e3:.1f})", file=sys.stderr, flush=True)

    where = dict(bind_addr=listen[0], port=listen[1], local_workers=False,
                 store_allow=_store_allow(args)) if listen else {}
    with launch_engine(args.world_size, args.model, profile, checkpoint=args.checkpoint, seed=args.seed,
                       config=config, cores_per_worker=args.cores_per_worker, link_file=args.link_file,
                       timeout_s=args.timeout, secret_file=args.secret_file, **where) as engine:
        if listen and not (args.profile or args.synthetic_profile):
            _await_profiled_devices(engine)
        if args.http:
            _serve_http(engine, args, write, access)
            return 0
        try:
            served, refused = serve_lines(engine, stream, write, args.outputs)
        finally:
            if stream is not sys.stdin:
                stream.close()
        failures = engine.failures
    print(f"edgeprism serve: {served} served, {refused} refused"
          + (f", {failures} rerun on rank 0 after a lost peer" if failures else ""), file=sys.stderr, flush=True)
    return 0


def _serve_succession(args, config, profile, access) -> int:
    """--coordinators: coordinate (store, rank 0, HTTP) unless another address of the list already serves,
    then be a device of it that takes over in its turn (edgeprism.runtime.succession)."""
    from dataclasses import replace

    from edgeprism.cli.join import run_until_stopped, serve_promoted
    from edgeprism.comm.auth import SECRET_FILE_ENV, load_secret
    from edgeprism.models.loading import resolve_model
    from edgeprism.runtime.coordinator import DeviceOptions, coordinator_spec
    from edgeprism.runtime.succession import Succession, Successor, parse_coordinators
    from edgeprism.testbed.emulation import LINK_FILE_ENV, EmulatedLink

    succession = Succession(parse_coordinators(args.coordinators), args.listen.strip())
    model, checkpoint = resolve_model(args.model, args.checkpoint)
    service = {"http_port": args.port, "served_model_name": args.served_model_name,
               "dynamic_batching": not args.no_batching, "batch_window_s": args.batch_window_ms / 1e3,
               "outputs": args.outputs, "guard_margin": args.guard_margin,
               "access": access.to_service(),  # file paths, never the key
               "store_allow": ",".join(str(n) for n in _store_allow(args))}
    spec = coordinator_spec(model, args.seed, checkpoint is not None, args.world_size, args.timeout,
                            replace(config, wait_for_workers=False), profile, succession.addresses, service)
    link_file = args.link_file or None
    env = {LINK_FILE_ENV: link_file} if link_file else {}

    def say(text: str) -> None:
        print(f"edgeprism serve: {text}", file=sys.stderr, flush=True)

    options = DeviceOptions(address=succession.own, checkpoint=checkpoint, connect_timeout_s=args.timeout)
    secret = load_secret({SECRET_FILE_ENV: args.secret_file})
    http = f"{args.host}:{args.port}"
    successor = Successor(succession, options, secret, args.secret_file, link=EmulatedLink.from_env(env),
                          on_event=say, spec=spec, link_file=link_file,
                          serve=lambda engine, spec, stop: serve_promoted(engine, spec, stop, succession.own, http,
                                                                          checkpoint, say))
    return run_until_stopped(successor, say)


def _await_profiled_devices(engine, timeout_s: float = 120.0) -> None:
    """The devices just profiled join again within seconds: wait for them (bounded) before answering, so
    that the first requests are planned over the whole cluster. Devices that do not come back are taken in
    whenever they do."""
    from edgeprism.runtime.cluster_profile import wait_for_devices

    def say(text: str) -> None:
        print(f"edgeprism serve: {text}", file=sys.stderr, flush=True)

    try:
        wait_for_devices(engine, say, timeout_s)
    except TimeoutError as err:
        say(f"serving without them for now: {err}")


def _serve_http(engine, args, write, access) -> None:
    """The HTTP API until Ctrl-C / SIGTERM; inputs read with the checkpoint's own files where it has them."""
    from edgeprism.api import ApiConfig, serve_http
    from edgeprism.inputs import load_io

    try:
        io = load_io(engine.model.config, args.checkpoint)
    except ValueError as err:  # e.g. a random-weight text preset has no tokenizer: tensors only
        print(f"edgeprism serve: only POST /infer (tensor requests) is served: {err}", file=sys.stderr, flush=True)
        io = None
    config = ApiConfig(model_name=args.served_model_name, dynamic_batching=not args.no_batching,
                       batch_window_s=args.batch_window_ms / 1e3, outputs_mode=args.outputs,
                       guard_margin=args.guard_margin)

    def ready(host: str, port: int) -> None:
        scheme = "https" if access.tls else "http"
        print(f"edgeprism serve: listening on {scheme}://{host}:{port} (Ctrl-C stops)", file=sys.stderr, flush=True)

    serve_http(engine, io, args.host, args.port, config, on_reply=write, on_ready=ready, access=access)


def _access(args):
    """The HTTP API's protection (edgeprism.api.auth), checked before anything starts: a missing key file,
    half a TLS pair, or an address off loopback with neither a key nor --http-insecure is the user's error now."""
    from edgeprism.api.auth import HttpAccess, check_exposure, load_api_key

    access = HttpAccess(api_key_file=args.api_key_file, metrics_open=args.metrics_open, tls_cert_file=args.tls_cert,
                        tls_key_file=args.tls_key, insecure=args.http_insecure)
    if not args.http:
        if access != HttpAccess():
            raise ValueError("--api-key-file, --metrics-open, --tls-cert, --tls-key and --http-insecure are for --http")
        return access
    if access.api_key_file is not None:
        load_api_key(access.api_key_file)
    check_exposure(args.host, args.port, access)
    if args.coordinators and args.listen:  # a promoted device serves at its own --listen host: the same rule there
        from edgeprism.runtime.coordinator import parse_address

        check_exposure(parse_address(args.listen)[0], args.port, access)
    return access


def _store_allow(args) -> tuple:
    """--store-allow's networks, with every --coordinators host (each must reach whichever serves); ()."""
    from edgeprism.runtime.coordinator import parse_address
    from edgeprism.runtime.store_filter import parse_allow

    if args.store_allow is None:
        return ()
    networks = parse_allow(args.store_allow)
    if not networks:
        raise ValueError(f"--store-allow {args.store_allow!r} names no address")
    hosts = [parse_address(a.strip())[0] for a in (args.coordinators or "").split(",") if a.strip()]
    return tuple(dict.fromkeys((*networks, *parse_allow(",".join(hosts)))))


def _listen(args) -> tuple[str, int] | None:
    """(host, port) of --listen, checked: the devices prove they hold the secret file (on loopback too: they
    read the same file); every interface only if the address says so."""
    from edgeprism.runtime.coordinator import parse_address

    if not args.listen:
        if args.store_allow is not None:
            raise ValueError("--store-allow is for --listen (the store a coordinator serves)")
        return None
    host, port = parse_address(args.listen)
    _store_allow(args)  # a bad list is named before anything starts
    if not args.secret_file:
        raise ValueError(f"--listen {args.listen} needs --secret-file FILE, the secret every device proves it holds "
                         f"(at least 16 random bytes, mode 600: `head -c 32 /dev/urandom > cluster.secret && chmod 600 "
                         f"cluster.secret`; copy it to every device)")
    if host in ("0.0.0.0", "::"):
        log.warning("--listen %s binds every interface of this machine", args.listen)
    return host, port


def _open(path: str):
    try:
        return open(path)
    except OSError as err:
        raise ValueError(f"cannot read requests from {path}: {err.strerror}") from None
