"""`edgeprism profile`: measure compute, staging, link and energy once; write the versioned profile.

    edgeprism profile --model vit-base-patch16-224 --world-size 2 --link wifi4 --out vit.profile.json --validate

With `--validate`, fresh end-to-end runs at points the profile did not sample are compared with the
cost model's predictions (median and worst relative error). `--check FILE` loads an existing profile
and checks it against `--model` and `--world-size` instead of measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from edgeprism.cli.model_arg import CHECKPOINT_HELP, MODEL_HELP
from edgeprism.profile.profiler import DEFAULT_BATCHES


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated whole numbers, e.g. 1,2,4,8") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one number")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("profile", help="measure this hardware once and write the profile the planner reads",
                              description="Time one block of the model per grid point on every device at once (each "
                                          "pinned to its own core), the staging copies, the link (through the "
                                          "runtime's collectives) and the energy per phase; record each codec's "
                                          "wire cost and fidelity.")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--world-size", type=int, default=2, help="devices the profile is for (default 2)")
    p.add_argument("--link", metavar="PRESET", help="emulated link between the devices: wifi5, wifi4, congested, lan "
                                                    "(default: unshaped loopback)")
    p.add_argument("--rate", type=float, metavar="BPS", help="link rate in bit/s (overrides the preset's)")
    p.add_argument("--delay", type=float, metavar="S", help="one-way link delay in seconds (overrides the preset's)")
    p.add_argument("--link-backend", choices=["auto", "netns", "loopback"], default="auto",
                   help="testbed: netns + kernel tbf (root), or loopback with the link emulated in the transport")
    p.add_argument("--batches", type=_int_list, default=DEFAULT_BATCHES,
                   help="batch sizes to cover (a sparse subset is timed); default 1,2,4,8,16,32")
    p.add_argument("--batch-points", type=int, default=4, help="batch sizes actually timed (default 4)")
    p.add_argument("--seq-lens", type=_int_list, help="text models: token counts to time (default 32,128)")
    p.add_argument("--image-size", type=int, help="ViT: image side in pixels (default the model's)")
    p.add_argument("--codecs", type=_name_list, help="codecs to record (default the standard family)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (staging is measured on a GPU)")
    p.add_argument("--compute-on", choices=["devices", "here"], default="devices",
                   help="time compute on every device at once (default, as requests run) or in this process")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per point (median)")
    p.add_argument("--fidelity", metavar="FILE", help="import fidelity rows written by `edgeprism eval --out`")
    p.add_argument("--no-eval", action="store_true", help="do not run the model's evaluation set for fidelity")
    p.add_argument("--eval-limit", type=int, default=32, help="requests per evaluation set (default 32)")
    p.add_argument("--meter", default="auto", help="energy meter: auto, ina3221, rapl, nvml, zeus, modelled")
    p.add_argument("--power-model", help="power model when energy is modelled (default generic-cpu-core)")
    p.add_argument("--out", metavar="FILE", help="where to write the profile JSON (required unless --check)")
    p.add_argument(
        "--check", metavar="FILE", help="load FILE and check it against --model/--world-size; measure nothing"
    )
    p.add_argument("--validate", action="store_true",
                   help="compare the cost model with fresh runs at held-out points (median/max error)")
    p.add_argument("--validate-batches", type=_int_list, help="batch sizes for validation (default: held out)")
    p.add_argument("--validate-codecs", type=_name_list, help="codecs for validation (default: held out)")
    p.add_argument("--validate-passes", type=int, default=2,
                   help="round-robin passes over the validation points (median per point; default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--listen", metavar="ADDR:PORT",
                   help="profile real devices: be their coordinator on ADDR:PORT, wait until --world-size - 1 devices "
                        "joined (`edgeprism join ADDR:PORT --secret-file F`), measure them all and write the profile "
                        "with each device's speed and description; needs --secret-file. docs/DEPLOY.md")
    p.add_argument("--secret-file", metavar="FILE", help="--listen: the cluster secret every device proves it holds")
    p.add_argument("--join-timeout", type=float, default=600.0, metavar="S",
                   help="--listen: seconds to wait for the devices to join (default 600)")
    p.set_defaults(handler=handle)


class _Bar:
    """A one-line progress bar on stderr (a line per step when stderr is not a terminal)."""

    def __init__(self, stream=None, width: int = 28) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()

    def __call__(self, done: int, total: int, label: str) -> None:
        filled = int(self.width * done / max(1, total))
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {label}"
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if done >= total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def say(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def _options(args):
    from edgeprism.profile.profiler import ProfileOptions
    from edgeprism.testbed.presets import resolve_link

    link = None
    if args.link or args.rate is not None or args.delay is not None:
        link = resolve_link(args.link, args.rate, args.delay)
    return ProfileOptions(model=args.model, world_size=args.world_size, checkpoint=args.checkpoint, link=link,
                          link_backend=args.link_backend, batches=tuple(args.batches),
                          max_batch_points=args.batch_points, seq_lens=args.seq_lens, image_size=args.image_size,
                          codecs=tuple(args.codecs or ()), device=args.device, compute_on=args.compute_on,
                          warmup=args.warmup,
                          repeats=args.repeats, fidelity_file=args.fidelity, evaluate=not args.no_eval,
                          eval_limit=args.eval_limit, meter=args.meter, power_model=args.power_model)


def check(args) -> int:
    """Load and check an existing profile; with --validate, validate it against fresh runs on --link."""
    from edgeprism.models.loading import model_config
    from edgeprism.profile.schema import Profile

    profile = Profile.load(args.check, expect_model=model_config(args.model, args.checkpoint),
                           expect_world_size=args.world_size)
    out = {"profile": args.check, "ok": True, "profile_hash": profile.profile_hash(), "summary": str(profile)}
    if args.validate:
        options = _options(args)
        sampled = tuple(sorted({s.batch for s in profile.compute.samples}))
        profiled_tokens = tuple(sorted({s.num_own_tokens for s in profile.compute.samples
                                        if s.num_own_tokens == s.num_kv_vectors and s.num_own_tokens > 1}))
        with _session(options) as session:
            validation = _validate(args, options, profile, session, sampled, profiled_tokens, _Bar())
        out.update(validation.to_dict())
    if args.json:
        print(json.dumps(out, indent=1))
    elif args.validate:
        print(f"{args.check}: ok\n{profile}\n" + format_validation(out))
    else:
        print(f"{args.check}: ok\n{profile}")
    return 0


def _session(options):
    from edgeprism.profile.link import LinkSession

    return LinkSession(options.world_size, options.link, backend=options.link_backend)


def _validate(args, options, profile, session, sampled, token_counts, bar):
    from edgeprism.jobs.validate import held_out_codecs, held_out_token_counts, validate, validation_points
    from edgeprism.profile.profiler import held_out_batches

    batches = args.validate_batches or held_out_batches(options.batches, sampled)
    codecs = args.validate_codecs or held_out_codecs(profile)
    points = validation_points(profile, batches, held_out_token_counts(profile, token_counts), codecs)
    bar.say(f"validation: {len(points)} fresh runs (batches {list(batches)}, codecs {list(codecs)}, and local)")
    return validate(profile, session, points, checkpoint=options.checkpoint, device=options.device,
                    passes=args.validate_passes, progress=bar)


def handle(args) -> int:
    from edgeprism.profile.profiler import run_profile, validate_options

    if args.check:
        return check(args)
    if not args.out:
        raise ValueError("give --out FILE for the profile (or --check FILE to check an existing one)")
    if args.listen:
        return handle_listen(args)
    options = _options(args)
    validate_options(options)
    if args.fidelity and args.no_eval:
        raise ValueError("--fidelity FILE and --no-eval contradict each other; give one")
    bar = _Bar()
    started = time.perf_counter()
    validation = None
    with _session(options) as session:
        report = run_profile(options, session, progress=bar, message=bar.say)
        report.profile.save(args.out)
        bar.say(f"profile written to {args.out} in {report.profile_seconds:.1f} s")
        if args.validate:
            validation = _validate(args, options, report.profile, session, report.sampled_batches,
                                   report.token_counts, bar)
    out = {"profile": args.out, "model": options.model, "world_size": options.world_size,
           "profile_seconds": report.profile_seconds, "total_seconds": time.perf_counter() - started,
           **report.to_dict(), "summary": str(report.profile)}
    if validation is not None:
        out.update(validation.to_dict())
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(format_report(out))
    return 0


def listen_address(listen: str, secret_file: str | None, flag: str = "--listen") -> tuple[str, int]:
    """(host, port) of a coordinator's --listen, checked: devices prove they hold the secret file."""
    from edgeprism.comm.auth import SECRET_FILE_ENV, load_secret
    from edgeprism.runtime.coordinator import parse_address

    host, port = parse_address(listen)
    if not secret_file:
        raise ValueError(f"{flag} {listen} needs --secret-file FILE, the secret every device proves it holds (at least "
                         f"16 random bytes, mode 600: `head -c 32 /dev/urandom > cluster.secret && chmod 600 "
                         f"cluster.secret`; copy it to every device)")
    load_secret({SECRET_FILE_ENV: secret_file})  # a bad secret file is named now
    return host, port


def handle_listen(args) -> int:
    """`edgeprism profile --listen`: profile the devices that join this coordinator (runtime.cluster_profile)."""
    from edgeprism.runtime.cluster_profile import profile_at

    if args.link or args.rate is not None or args.delay is not None or args.validate:
        raise ValueError("--listen profiles real devices over their real link: --link/--rate/--delay/--validate are "
                         "for the one-machine testbed")
    if args.join_timeout <= 0:
        raise ValueError(f"--join-timeout {args.join_timeout} must be > 0")
    listen = listen_address(args.listen, args.secret_file)
    options = _options(args)
    bar = _Bar()
    started = time.perf_counter()
    report = profile_at(listen, args.world_size, args.secret_file, options, say=bar.say, progress=bar,
                        join_timeout_s=args.join_timeout)
    report.profile.save(args.out)
    bar.say(f"profile written to {args.out} in {report.profile_seconds:.1f} s")
    out = {"profile": args.out, "model": options.model, "world_size": args.world_size,
           "profile_seconds": report.profile_seconds, "total_seconds": time.perf_counter() - started,
           **report.to_dict(), "summary": str(report.profile),
           "devices": [str(d) for d in report.profile.devices]}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(format_report(out) + "\n" + "\n".join(f"device {d}" for d in out["devices"]))
    return 0


def format_report(out: dict) -> str:
    lines = [out["summary"], f"profile: {out['profile']} ({out['profile_hash']})",
             f"profile_seconds: {out['profile_seconds']:.1f}  (" + ", ".join(
                 f"{k[:-2]} {v:.1f}" for k, v in out["phase_seconds"].items()) + ")",
             f"compute fit on its own samples: median {out['fit_median_rel_error']:.1%}, "
             f"max {out['fit_max_rel_error']:.1%} over {out['num_compute_points']} points",
             f"staging: {out['staging']['note']}", f"fidelity: {out['fidelity_note']}"]
    lines += _load_warning(out.get("load_average", ()), out.get("host_cores"), "profiling")
    if "points" in out:
        lines.append(format_validation(out))
    return "\n".join(lines)


def format_validation(out: dict) -> str:
    lines = [f"validation over {out['link']} ({out['validation_seconds']:.0f} s):",
             f"  {'mode':<11} {'B':>3} {'N':>4} {'codec':<10} {'measured ms':>11} {'predicted ms':>12} {'error':>7}"
             f"  measured compute/collective | predicted compute/network/latency ms"]
    for r in out["points"]:
        lines.append(f"  {r['mode']:<11} {r['batch']:>3} {r['num_tokens']:>4} {r['codec'] or '-':<10} "
                     f"{r['measured_s'] * 1e3:>11.1f} {r['predicted_s'] * 1e3:>12.1f} {r['rel_error']:>7.1%}  "
                     f"{r['measured_compute_s'] * 1e3:.0f}/{r['measured_collective_s'] * 1e3:.0f} | "
                     f"{r['predicted_compute_s'] * 1e3:.0f}/{r['predicted_network_s'] * 1e3:.0f}/"
                     f"{r['predicted_latency_s'] * 1e3:.0f}")
    lines.append(f"median_rel_error: {out['median_rel_error']:.1%}  max_rel_error: {out['max_rel_error']:.1%}")
    lines += _load_warning(out.get("validation_load_average", ()), os.cpu_count(), "validation")
    return "\n".join(lines)


def _load_warning(load_average, cores, what: str) -> list[str]:
    if not load_average or not cores or max(load_average) <= cores:
        return []
    return [f"WARNING: host load average {max(load_average):.1f} on {cores} cores during {what}: other work "
            "shared the emulated devices' cores, so timings (and errors) are noisier than on a quiet host"]
