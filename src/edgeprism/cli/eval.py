"""`edgeprism eval`: fidelity of each codec/CR against the single-device model, on real data."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger(__name__)


def _int_list(text: str) -> list[int]:
    values = []
    for piece in text.split(","):
        piece = piece.strip()
        try:
            value = float(piece)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"CR {piece!r} is not a number; give integers >= 1, e.g. 1,2,4,8"
            ) from None
        if value < 1 or value != int(value):
            raise argparse.ArgumentTypeError(f"CR {piece} must be a whole number >= 1 (tokens per segment)")
        values.append(int(value))
    return values


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="measure each codec's fidelity against the single-device model",
                              description="Run the distributed model with each codec (or Segment Means CR) on the "
                                          "model's evaluation set and compare with the single-device model.")
    p.add_argument("--model", required=True, help="minilm-l6, dinov2-s14, gpt2-shakespeare (or a *-test preset); "
                                                   "with --data, any checkpoint folder (docs/MODELS.md)")
    p.add_argument("--data", metavar="JSONL", help='your own data instead of the model\'s evaluation set: lines '
                   '{"text": ...} or {"image": path}, each with an optional "label" (docs/MODELS.md)')
    p.add_argument("--calibration-fraction", type=float, metavar="F",
                   help="with --data: choose each low-bit codec's outlier/rotation settings on this fraction of the "
                        "items and report on the rest")
    p.add_argument("--batch-size", type=int, default=8, help="with --data: rows per request (decoders: 1)")
    p.add_argument("--cr", type=_int_list, help="Segment Means ratios, e.g. 1,2,4,8,16,32 (codec smN)")
    p.add_argument("--codec", help="codec names, e.g. fp16,int8,int4,sm4,sm4a,sm16a+int8")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--shares", help="token shares per rank (default equal)")
    p.add_argument("--size-aware", choices=["off", "on", "both"], default="on",
                   help="log(count) logit bias for received means (both = measure each)")
    p.add_argument("--average", choices=["residual", "normed", "both"], default="normed",
                   help="what Segment Means averages: the normalised K/V input (default) or the residual stream")
    p.add_argument("--limit", type=int, help="requests per evaluation set (default: the set's own; with --data: the "
                                             "file's first N items)")
    p.add_argument("--checkpoint", help="evaluate these weights (e.g. `edgeprism calibrate --out DIR`) instead of "
                                        "the model's shipped ones; the data are the same")
    p.add_argument("--out", help="also append the rows as JSON lines to this file")
    p.add_argument("--plot", metavar="PNG", help="draw the fidelity-traffic frontier of the rows to this file")
    p.add_argument("--from-rows", metavar="JSONL", help="do not evaluate: read rows written by --out (with --plot)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=handle)


def handle(args) -> int:
    if args.from_rows:
        rows = [json.loads(line) for line in open(args.from_rows) if line.strip()]
        return _emit(args, rows)
    from edgeprism.compress.registry import get_codec, parse_codec_list
    from edgeprism.evaluate.eval_sets import eval_sets_for
    from edgeprism.evaluate.fidelity import evaluate
    from edgeprism.partition.ranges import validate_shares

    if args.world_size < 2:
        raise ValueError(f"--world-size {args.world_size}: fidelity of a split needs at least 2 ranks")
    codecs = [f"sm{cr}" for cr in (args.cr or [])] + (
        [str(c) for c in parse_codec_list(args.codec)] if args.codec else []
    )
    if args.data and not codecs:
        codecs = list(DATA_CODECS)
    if not codecs:
        raise ValueError("give --cr and/or --codec, e.g. --cr 1,2,4,8,16,32 or --codec fp16,int8,sm4a")
    for name in codecs:
        get_codec(name)
    shares = validate_shares([float(x) for x in args.shares.split(",")], args.world_size) if args.shares else None
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit} must be >= 1")
    progress = lambda message: print(message, file=sys.stderr, flush=True)
    if args.checkpoint is not None and not os.path.isdir(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint}: no such directory")
    if args.data:
        return _write(args, _data_rows(args, codecs, shares, progress))
    if args.calibration_fraction is not None:
        raise ValueError("--calibration-fraction splits your --data; give --data FILE.jsonl")
    sets = eval_sets_for(args.model, args.limit, progress=progress, checkpoint=args.checkpoint)
    weightings = {"off": [False], "on": [True], "both": [False, True]}[args.size_aware]
    rows = []
    for eval_set in sets:
        progress(f"{eval_set.name}: {eval_set.description or eval_set.num_requests} requests, "
                 f"{args.world_size} ranks, {len(codecs)} codecs")
        averages = ["residual", "normed"] if args.average == "both" else [args.average]
        for size_aware in weightings:
            for average in averages:
                rows += [r.to_dict() for r in evaluate(eval_set, codecs, args.world_size, shares, size_aware,
                                                       progress, average)]
    return _write(args, rows)


def _write(args, rows: list[dict]) -> int:
    if args.out:
        with open(args.out, "a") as handle_:
            for row in rows:
                handle_.write(json.dumps(row) + "\n")
    return _emit(args, rows)


DATA_CODECS = ("fp16", "int8", "int4", "lb3o4r", "delta:lb4o4r:lb3o4r", "sm4a+int8")
"""What `eval --data` measures when no --codec/--cr is given: the quantising family and one Segment Means."""


def _data_rows(args, codecs: list[str], shares, progress) -> list[dict]:
    """Rows of every codec on the user's --data (settings chosen on the calibration split if asked)."""
    from pathlib import Path

    from edgeprism.evaluate.settings import evaluate_user_data
    from edgeprism.evaluate.user_data import read_items, split_items
    from edgeprism.inputs.io import load_io
    from edgeprism.models.config import list_presets
    from edgeprism.models.loading import load_model

    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    if (args.size_aware, args.average) != ("on", "normed"):
        log.warning("--size-aware %s / --average %s: eval --data measures the runtime's defaults only (what a "
                    "profile imports); not applied", args.size_aware, args.average)
    model = load_model(args.model, args.checkpoint)
    io = load_io(model.config, args.checkpoint)
    items = read_items(args.data, model.config.modality)[:args.limit]  # --limit: the file's first items
    calibration, report = split_items(items, args.calibration_fraction)
    progress(f"{model.config.name}: {len(report)} items to report on" +
             (f", {len(calibration)} to choose codec settings on" if calibration else "") +
             f", {args.world_size} ranks, {len(codecs)} codecs")
    rows, chosen = evaluate_user_data(model, io, report, codecs, args.world_size, shares, calibration,
                                      args.batch_size, Path(args.data).name, progress)
    for name, entry in chosen.items():
        progress(f"{name}: {entry['chosen']} chosen on the calibration split ({entry['metric']})")
    if args.out:
        names = ",".join(dict.fromkeys(row["codec"] for row in rows))
        model_args = (f"--model {args.model}" + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "")
                      if args.model in list_presets() else f"--model {args.checkpoint}")
        progress(f"import into a profile: edgeprism profile {model_args} --world-size {args.world_size} "
                 f"--codecs {names} --fidelity {args.out} ...")
    return rows


def _emit(args, rows: list[dict]) -> int:
    if args.plot:
        from pathlib import Path

        from edgeprism.bench.report import write_frontier_plot

        write_frontier_plot(Path(args.plot), rows)
    if args.json:
        print(json.dumps({"model": args.model, "world_size": args.world_size, "rows": rows}, indent=1))
    else:
        print(format_table(rows))
    return 0


def format_table(rows: list[dict]) -> str:
    lines = [f"{'set':<22} {'codec':<12} {'aware':<5} {'avg':<8} {'metric':<17} {'value':>9} {'ref':>9} {'loss':>7} "
             f"{'bytes/req':>12} {'traffic':>8}"]
    for r in rows:
        lines.append(f"{r['eval_set']:<22} {r['codec']:<12} {'yes' if r['size_aware'] else 'no':<5} {r['average']:<8} "
                     f"{r['metric']:<17} "
                     f"{r['value']:>9.4f} {r['reference_value']:>9.4f} {r['loss']:>7.2%} "
                     f"{r['bytes_per_request']:>12,.0f} {r['traffic_vs_fp32']:>8.3f}")
    return "\n".join(lines)
