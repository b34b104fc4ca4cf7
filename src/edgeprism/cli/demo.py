"""`edgeprism demo`: 2 emulated devices on a WiFi link (or one per `--speeds` value, each with that CPU
quota), profiled, then a mixed workload served by every strategy side by side, with a link change in
the middle. Prints the table; writes a report."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from edgeprism.cli.budget import add_budget_arguments
from edgeprism.cli.testbed import parse_speeds

DEFAULT_DEMO_MODEL = "dinov2-s14"
REAL_DATA = {"dinov2-s14": "fashion-mnist"}
"""Models the demo serves real images to by default (their weights and probe come from `make assets`)."""
DEMO_CODECS = ("fp32", "fp16", "bf16", "int8", "lb4o4r", "lb3o4r", "delta:lb4o4r:lb3o4r")
"""Codecs a real-weights demo profiles (with measured fidelity); the static Segment Means codec is added."""


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="profile, then serve a mixed workload adaptively vs static strategies",
                              description=__doc__)
    p.add_argument("--model", default=DEFAULT_DEMO_MODEL,
                   help=f"default {DEFAULT_DEMO_MODEL} with its real weights (`make assets`) on Fashion-MNIST "
                        f"images at 224 px; vit-base-patch16-224: random weights, speed only")
    p.add_argument("--data", choices=("auto", "synthetic", "fashion-mnist"), default="auto",
                   help="what is served: auto = real images scored by a probe where the model has them "
                        f"({', '.join(REAL_DATA)}), else seeded synthetic inputs")
    p.add_argument("--checkpoint", help="the model's weights folder (default: the cached real weights with "
                                        "--data fashion-mnist, else seeded random weights)")
    p.add_argument("--image-size", type=int, help="image side in pixels (default 224 with real images)")
    p.add_argument("--eval-limit", type=int, default=200,
                   help="real weights: evaluation images per codec when profiling its fidelity (default 200: one "
                        "disagreement is 0.5 %%, fine enough for the 1 %% budget; 32 would make it 3 %%)")
    p.add_argument("--batches", type=_ints, default=(1, 2, 4, 8, 16, 32), help="batch sizes (default 1..32)")
    p.add_argument("--links", default="wifi4,congested", help="link preset per phase (default wifi4,congested)")
    p.add_argument("--segment-means-codec", default="sm16", help="the static Segment Means strategy's codec")
    p.add_argument("--objective", choices=["latency", "energy", "edp"], default="latency")
    add_budget_arguments(p)
    p.add_argument("--profile", help="use this profile instead of profiling (must match model, 2 ranks, the link)")
    p.add_argument("--reprofile", action="store_true", help="ignore the cached profile")
    p.add_argument("--medium", choices=("switched", "shared"), default="switched",
                   help="testbed: each device its own link (default), or one shared channel (netns)")
    p.add_argument("--backend", choices=["auto", "netns", "loopback"], default="auto",
                   help="testbed: netns (kernel-shaped links, root) or loopback (emulated in the transport)")
    p.add_argument("--out", default="reports/demo", help="report folder (default reports/demo)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds per batch, interleaved (default 3; tables give the median and the spread)")
    p.add_argument("--speeds", type=parse_speeds, metavar="S0,S1,...",
                   help="devices of these CPU quotas in cores, fastest first (testbed cgroups, root): one device "
                        "per value; adds the strategies equal_split and fast_alone (default: 2 whole cores)")
    p.add_argument("--codecs", type=lambda text: tuple(c.strip() for c in text.split(",") if c.strip()), default=(),
                   help="plan only with these of the profile's codecs (default with --speeds: those that send every "
                        "token, i.e. no Segment Means; the fidelity budget still applies)")
    p.add_argument("--share-step", type=float, default=0.0,
                   help="with --speeds: also measure every split in share steps of this size (the oracle's)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the demo job is stopped")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(handler=handle)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _profile(args, session, link) -> str:
    """A cached profile for (model, 2 ranks, link, emulation), or a fresh one (< 2 min)."""
    from edgeprism.assets import cache_dir
    from edgeprism.assets.datasets import dinov2_input_fingerprint
    from edgeprism.compress.registry import list_codecs
    from edgeprism.profile.profiler import ProfileOptions, run_profile
    from edgeprism.profile.schema import Profile

    if args.profile:
        return args.profile
    real = args.data != "synthetic"
    # the fidelity measured on real images holds for their preprocessing: a new one measures afresh
    suffix = (f"-{args.data}-{args.image_size}-e{args.eval_limit}-{dinov2_input_fingerprint(args.image_size)}"
              if real else "")
    world = session.world_size
    quotas = "" if not args.speeds else "-s" + "_".join(f"{s:g}" for s in args.speeds)
    path = (cache_dir() / "profiles"
            / f"{args.model}-w{world}{quotas}-{link.name}-{session.testbed.emulation}{suffix}.json")
    if path.exists() and not args.reprofile:
        missing = set(args.codecs) - {c.codec for c in Profile.load(path).codecs}
        if not missing:
            _say(f"profile: using cached {path} (--reprofile to measure again)")
            return str(path)
        _say(f"profile: cached {path} lacks the codecs {sorted(missing)}: measuring again")
    _say(f"profile: measuring {args.model} on {world} devices over {link} ({session.emulation}) ...")
    # Real weights: every codec's fidelity is measured on the model's evaluation set, so the adaptive plan can
    # use what is faithful; random weights measure nothing (only lossless codecs, or --allow-unmeasured-codecs).
    codecs = tuple(dict.fromkeys((*DEMO_CODECS, args.segment_means_codec))) if real else ()
    if args.codecs:  # --codecs beyond the default family (kv50:int8) must be in the profile too
        codecs = tuple(dict.fromkeys((*(codecs or list_codecs()), args.segment_means_codec, *args.codecs)))
    options = ProfileOptions(model=args.model, world_size=world, link=link, link_backend=args.backend,
                             batches=tuple(sorted(set(args.batches))), evaluate=real, checkpoint=args.checkpoint,
                             image_size=args.image_size, codecs=codecs, eval_limit=args.eval_limit)
    report = run_profile(options, session, progress=lambda done, total, what: _say(f"  [{done}/{total}] {what}"),
                         message=lambda text: _say(f"  {text}"))
    measured = report.profile.device_speeds
    if args.speeds and any(abs(m / measured[0] - s / args.speeds[0]) > 0.25 * s / args.speeds[0]
                           for m, s in zip(measured, args.speeds)):
        _say(f"WARNING: measured device speeds {measured} do not follow the quotas {list(args.speeds)} (the "
             "machine is busier than the quotas assume: a quota caps, it does not reserve); not cached")
        path = Path(tempfile.mkdtemp(prefix="edgeprism-profile-")) / path.name
    path.parent.mkdir(parents=True, exist_ok=True)
    report.profile.save(path)
    _say(f"profile: {report.profile_seconds:.0f} s, saved to {path}")
    return str(path)


def handle(args) -> int:
    from edgeprism.bench.demo import DemoSpec, accuracy_by_strategy, add_oracle, every_token_codecs, ratios, summarize
    from edgeprism.bench.demo_devices import add_fast_alone
    from edgeprism.models.config import get_config
    from edgeprism.plan.types import Limits
    from edgeprism.profile.link import LinkSession
    from edgeprism.testbed.presets import get_preset

    get_config(args.model)
    if args.data == "auto":
        args.data = REAL_DATA.get(args.model, "synthetic")
    if args.data == "fashion-mnist":
        from edgeprism.assets import dinov2_checkpoint_dir

        args.image_size = args.image_size or 224
        if not args.checkpoint:
            if args.model != DEFAULT_DEMO_MODEL:
                raise ValueError(f"--data fashion-mnist with {args.model}: give --checkpoint (real weights)")
            args.checkpoint = str(dinov2_checkpoint_dir())  # ValueError naming `make assets` when missing
    links = [get_preset(name.strip()) for name in args.links.split(",")]
    if any(b < 1 for b in args.batches):
        raise ValueError(f"--batches {list(args.batches)} must all be >= 1")
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats} must be >= 1")
    Limits(args.max_fidelity_loss, None, args.allow_unmeasured_codecs)
    speeds = tuple(args.speeds or ())
    if speeds and speeds[0] != max(speeds):
        raise ValueError(f"--speeds {list(speeds)}: put the fastest device first (rank 0 coordinates and runs "
                         "the local and fast_alone strategies)")
    if args.share_step and not (speeds and 0 < args.share_step <= 0.5):
        raise ValueError(f"--share-step {args.share_step} needs --speeds and a step in (0, 0.5]")
    world = len(speeds) or 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_file = out_dir / "rows.jsonl"
    rows_file.write_text("")
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with LinkSession(world, links[0], backend=args.backend, timeout_s=args.timeout, speeds=speeds or None,
                     medium=args.medium) as session, \
            tempfile.TemporaryDirectory(prefix="edgeprism-demo-") as control:
        emulation = session.testbed.emulation
        _say(f"testbed: {world} devices ({session.testbed.describe()}), link {links[0]} ({emulation})")
        profile = _profile(args, session, links[0])
        spec = DemoSpec(model=args.model, profile=os.path.abspath(profile), checkpoint=args.checkpoint or "",
                        data=args.data, image_size=args.image_size, batches=tuple(args.batches),
                        links=tuple(link.name for link in links), segment_means_codec=args.segment_means_codec,
                        objective=args.objective, max_fidelity_loss=args.max_fidelity_loss,
                        allow_unmeasured_codecs=args.allow_unmeasured_codecs, repeats=args.repeats,
                        rows_file=str(rows_file.resolve()), control_dir=control, speeds=speeds,
                        share_step=args.share_step, codecs=args.codecs)
        _follow(session, spec, links, rows_file, control)
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    # the oracle is held to the adaptive plan's rules: its budget, its opt-in and its codec allow-list
    allowed = args.codecs or (every_token_codecs(rows) if speeds else None)
    rows = add_oracle(add_fast_alone(rows, speeds), args.max_fidelity_loss, args.allow_unmeasured_codecs, allowed)
    table = summarize(rows)
    gains = ratios(table)
    with open(out_dir / "rows.jsonl", "w") as handle_:
        for row in rows:
            handle_.write(json.dumps({**row, "emulation": emulation}) + "\n")
    report = {"model": args.model, "data": args.data, "checkpoint": args.checkpoint or "random weights",
              "image_size": args.image_size, "probe_accuracy": accuracy_by_strategy(rows), "world_size": world,
              "speeds": list(speeds), "emulation": emulation, "links": [str(link) for link in links],
              "segment_means_codec": args.segment_means_codec, "objective": args.objective,
              "max_fidelity_loss": args.max_fidelity_loss, "allow_unmeasured_codecs": args.allow_unmeasured_codecs,
              "fidelity": fidelity_note(rows, args.allow_unmeasured_codecs), "profile": profile,
              "codecs": list(args.codecs) or ("every-token codecs of the profile (no Segment Means)" if speeds
                                              else "any of the profile's"),
              "demo_seconds": time.perf_counter() - started, "rows": table, "ratios": gains,
              "host_load": host_load(load_before, os.getloadavg()[0], world),
              "note": f"{world} emulated devices = {world} worker processes pinned to cores"
                      + (f" with CPU quotas {list(speeds)} (cgroups)" if speeds else ", one core each")
                      + " on this machine; energy is modelled from measured phase times unless energy_source says "
                        "metered"}
    (out_dir / "summary.json").write_text(json.dumps(report, indent=1))
    from edgeprism.bench.report import write_markdown, write_plots

    write_markdown(out_dir / "summary.md", report)
    plots = write_plots(out_dir, rows, table)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
        print(f"\nreport: {out_dir}/summary.md, rows.jsonl" + (f", {len(plots)} plots" if plots else ""))
    return 0


def _follow(session, spec, links, rows_file: Path, control: str) -> None:
    """Run the demo job on the session's devices; print its rows as progress; change the link on request."""
    failure: list[BaseException] = []

    from edgeprism.bench.demo import demo_rank
    from edgeprism.comm.auth import SECRET_FILE_ENV, new_secret, write_secret_file

    # Every rank holds a fresh cluster secret: nothing else on the machine can join or drive the workers.
    secret_file = write_secret_file(Path(control) / "cluster.secret", new_secret())

    def job() -> None:
        try:
            session.run(demo_rank, {"spec": spec.to_json()}, env={SECRET_FILE_ENV: str(secret_file)},
                        dist_backend="gloo")
        except BaseException as err:  # re-raised in the caller's thread
            failure.append(err)

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    seen, changed = 0, set()
    from edgeprism.bench.demo import phase_strategies

    total = sum(len(phase_strategies(spec, p)) for p in range(len(spec.links))) * len(spec.batches) * spec.repeats
    while True:
        alive = thread.is_alive()
        lines = [line for line in rows_file.read_text().splitlines() if line.strip()] if rows_file.exists() else []
        for line in lines[seen:]:
            row = json.loads(line)
            seen += 1
            _say(f"[{seen}/{total}] {row['link']:<9} batch {row['batch']:>2} {row['strategy']:<13} "
                 f"{row['latency_s'] * 1e3:9.1f} ms  {row['energy_j']:7.2f} J  {row['plan']}")
        for phase in range(1, len(links)):
            if phase not in changed and os.path.exists(os.path.join(control, f"phase-{phase}.request")):
                session.testbed.set_link(links[phase])
                changed.add(phase)
                _say(f"link changed to {links[phase]}")
                Path(control, f"phase-{phase}.ack").write_text("ok")
        if not alive:
            break
        thread.join(0.2)
    if failure:
        raise failure[0]


def host_load(before: float, after: float, devices: int = 0) -> str:
    """The 1-minute load average around the run, and whether the host was too busy for its numbers to stand. The
    `devices` emulated devices are this run's own processes, each one runnable while it computes: the load after
    the run holds them, so only a load beyond the cores plus them says that other work shared the cores."""
    cores = os.cpu_count() or 1
    busy = before > cores or after > cores + devices
    return (f"load average {before:.1f} before, {after:.1f} after, on {cores} cores"
            + (f" (the {devices} emulated devices count in the load after)" if devices else "")
            + ("; BUSY: other work shared the cores, so latencies are slower and noisier than this host's own"
               if busy else ""))


def fidelity_note(rows: list[dict], allow_unmeasured: bool) -> str:
    """What the rows say about answers: which plans were measured faithful, which were not measured at all."""
    unmeasured = sorted({r["strategy"] for r in rows if r.get("fidelity_loss", 0.0) is None})
    adaptive = "adaptive: codecs of unmeasured fidelity allowed (--allow-unmeasured-codecs)" if allow_unmeasured \
        else "adaptive: only codecs measured within the fidelity budget, or lossless (fp32/fp16/bf16)"
    if not unmeasured:
        return f"{adaptive}; every answer measured faithful"
    return f"{adaptive}; answers of unmeasured fidelity (fidelity_loss null): {', '.join(unmeasured)}"


def _spread(row: dict) -> str:
    if row.get("latency_p25_s") is None:
        return f"{row['latency_s'] * 1e3:.1f}"
    return f"{row['latency_s'] * 1e3:.1f} [{row['latency_p25_s'] * 1e3:.0f}-{row['latency_p75_s'] * 1e3:.0f}]"


def _loss(value) -> str:
    return "?" if value is None else f"{value:.2%}"


def format_table(report: dict) -> str:
    lines = [f"{report['model']} on {report['world_size']} emulated devices ({report['emulation']}); "
             "latency (ms) and modelled energy (J)",
             f"fidelity: {report.get('fidelity', '')}",
             f"host: {report.get('host_load', '')}",
             f"{'link':<10} {'batch':>5} {'strategy':<14} {'latency ms [p25-p75]':>23} {'energy J':>9} {'fid.loss':>8} "
             f"{'accuracy':>8}  plan"]
    for r in report["rows"]:
        accuracy = "-" if r.get("probe_accuracy") is None else f"{r['probe_accuracy']:.1%}"
        lines.append(f"{r['link']:<10} {r['batch']:>5} {r['strategy']:<14} {_spread(r):>23} "
                     f"{r['energy_j']:>9.2f} {_loss(r.get('fidelity_loss', 0.0)):>8} {accuracy:>8}  {r['plan']}"
                     + (f" [{r['codec_class']}]" if r.get("codec_class") else ""))
    if report.get("probe_accuracy"):
        lines.append("probe accuracy over every image served: " + ", ".join(
            f"{strategy} {value:.1%}" for strategy, value in report["probe_accuracy"].items()))
    lines.append("")
    lines.append(f"{'link':<10} {'batch':>5} {'adaptive vs full exchange':>27} {'energy vs full':>15} "
                 f"{'adaptive/oracle':>16}  adaptive plan")
    for g in report["ratios"]:
        vs_full = "-" if g["latency_reduction_vs_full"] is None else f"{-g['latency_reduction_vs_full']:+.1%}"
        energy = "-" if g["energy_reduction_vs_full"] is None else f"{-g['energy_reduction_vs_full']:+.1%}"
        lines.append(f"{g['link']:<10} {g['batch']:>5} {vs_full:>26} {energy:>15} "
                     f"{g['adaptive_over_oracle']:>15.2f}x  {g['adaptive_plan']}")
    return "\n".join(lines)
