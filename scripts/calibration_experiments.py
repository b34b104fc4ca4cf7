#!/usr/bin/env python
"""Compression-aware calibration experiments (docs/CALIBRATION.md): rows → benchmarks/results/calibration/.

    nice -n 19 python scripts/calibration_experiments.py --suite gpt2
    nice -n 19 python scripts/calibration_experiments.py --suite vit
    python scripts/calibration_experiments.py --tables-only

Every evaluation runs the real distributed path (PositionWise over the loopback transport) on held-out
data; calibration trains on disjoint data (GPT-2: the six committed plays, evaluated on Twelfth Night;
ViT: Fashion-MNIST train, evaluated on test). Rows are appended to rows.jsonl as each experiment ends;
tables.md is rebuilt from all rows. Weights are not kept (the CLI `edgeprism calibrate --out` keeps them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "calibration"

# (calibrated-for codec, world size, parameter set, distillation weight); "fp32" = the control: the same
# fine-tune with full exchange, i.e. no codec in the loop.
SUITES = {
    "gpt2": {"model": "gpt2-shakespeare", "eval_codecs": ["fp32", "sm4", "sm16"], "steps": 200, "batch_size": 8,
             "runs": [("sm16", 2, "full", 1.0), ("sm16", 2, "light", 1.0), ("fp32", 2, "full", 1.0),
                      ("sm4", 2, "full", 1.0), ("sm16", 4, "full", 1.0)]},
    "vit": {"model": "vit-fmnist-tiny", "eval_codecs": ["fp32", "sm4", "sm16"], "steps": 200, "batch_size": 64,
            "runs": [("sm16", 2, "full", 1.0), ("sm16", 2, "light", 1.0), ("fp32", 2, "full", 1.0),
                     ("sm4", 2, "full", 1.0), ("sm16", 4, "full", 1.0)]},
}
# Recovery against training cost: full vs light for one codec, each length a run of its own (own schedule).
for _name, _model, _batch in (("gpt2-curve", "gpt2-shakespeare", 8), ("vit-curve", "vit-fmnist-tiny", 64)):
    SUITES[_name] = {"model": _model, "eval_codecs": ["sm16"], "steps": 0, "batch_size": _batch,
                     "runs": [("sm16", 2, params, 1.0, steps) for params in ("full", "light") for steps in (25, 50, 100, 400)]}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_suite(name: str, steps: int | None, rows_path: Path, only: set[int] | None) -> None:
    from edgeprism.calibrate.runner import eval_rows
    from edgeprism.calibrate.tasks import setup_for
    from edgeprism.calibrate.train import CalibrationSettings, calibrate

    suite = SUITES[name]
    setup = setup_for(suite["model"], progress=log)
    shipped_done: set[int] = set()
    for index, (codec, world, params, distill, *run_steps) in enumerate(suite["runs"]):
        if only is not None and index not in only:
            continue
        settings = CalibrationSettings(codec, world, steps or (run_steps or [suite["steps"]])[0], params=params,
                                       distill=distill, batch_size=suite["batch_size"])
        rows = []
        if world not in shipped_done:
            rows += eval_rows(setup, setup.model, setup.head, suite["eval_codecs"], world, "as-shipped")
            shipped_done.add(world)
            log(f"{suite['model']} as shipped, world {world}: " + ", ".join(
                f"{r['codec']} {r['metric']}={r['value']:.4f}" for r in rows))
        log(f"calibrating {suite['model']} for {codec} world {world} ({params}, {settings.steps} steps)")
        model, head, result = calibrate(setup.model, setup.task, settings, progress=log)
        variant = "control-no-codec" if codec == "fp32" else "calibrated"
        after = eval_rows(setup, model, head, suite["eval_codecs"], world, variant)
        for row in after:
            row.update({"calibrated_for": codec, "calibration_world_size": world, "params": params,
                        "steps": settings.steps, "distill": distill, "batch_size": settings.batch_size,
                        "learning_rate": settings.learning_rate, "train_time_s": round(result.train_time_s, 1),
                        "train_cpu_s": round(result.train_cpu_s, 1), "suite": name,
                        "num_trainable": result.num_trainable, "first_loss": round(result.losses[0], 4),
                        "last_loss_mean10": round(result.to_dict()["last_loss_mean10"], 4)})
        log(f"  after ({result.train_time_s:.0f} s): " + ", ".join(
            f"{r['codec']} {r['metric']}={r['value']:.4f}" for r in after))
        rows += after
        common = {"suite": name, "calibration_data": setup.task.name, "torch_version": torch.__version__,
                  "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with rows_path.open("a") as handle:
            for row in rows:
                handle.write(json.dumps({**common, **row}) + "\n")


def write_tables(rows_path: Path, tables_path: Path) -> None:
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    out = ["# Compression-aware calibration: results", "",
           "Generated by `scripts/calibration_experiments.py` from `rows.jsonl` (docs/CALIBRATION.md explains).",
           "Every value is measured through the real distributed path (PositionWise, loopback transport) on",
           "held-out data. `local` = the same weights on one device. Train time: wall seconds on a shared 2-core",
           "CPU (contended; compare runs of one table only).", ""]
    for row in rows:  # rows of the first runs carried no suite name
        row.setdefault("suite", "gpt2" if row["model"].startswith("gpt2") else "vit")
    for model, suite in dict.fromkeys((r["model"], r["suite"]) for r in rows):
        model_rows = [r for r in rows if r["model"] == model and r["suite"] == suite]
        metric = "perplexity" if any(r["metric"] == "perplexity" for r in model_rows) else "accuracy"
        codecs = list(dict.fromkeys(r["codec"] for r in model_rows))
        out += [f"## {model}, suite `{suite}` ({metric}, {'lower' if metric == 'perplexity' else 'higher'} is better)",
                "", "| weights | calibrated for | world | params | steps | train s | train CPU s | local | "
                + " | ".join(f"{c} exchange" for c in codecs) + " |",
                "|---|---|---|---|---|---|---|---|" + "---|" * len(codecs)]
        groups: dict[tuple, dict] = {}
        for r in model_rows:
            if r["metric"] != metric:
                continue
            key = (r["variant"], r.get("calibrated_for", "-"), r["world_size"], r.get("params", "-"),
                   r.get("steps", 0), r.get("train_time_s", 0.0), r.get("train_cpu_s", ""))
            groups.setdefault(key, {})[r["codec"]] = r
        for (variant, target, world, params, steps, seconds, cpu), by_codec in groups.items():
            local = next(iter(by_codec.values()))["local_value"]
            cells = [f"{by_codec[c]['value']:.4f}" if c in by_codec else "" for c in codecs]
            if variant == "as-shipped":
                target = params = steps = seconds = cpu = "-"
            out.append(f"| {variant} | {target} | {world} | {params} | {steps} | {seconds} | {cpu} | {local:.4f} | "
                       + " | ".join(cells) + " |")
        out.append("")
    tables_path.write_text("\n".join(out) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), action="append", help="repeatable; default: all")
    parser.add_argument("--steps", type=int, help="override the suite's calibration steps")
    parser.add_argument("--runs", help="comma-separated indices of the suite's runs (default all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: oversubscribed threads on a shared CPU are far slower)")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--tables-only", action="store_true", help="only rebuild tables.md from rows.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_path = out_dir / "rows.jsonl"
    if not args.tables_only:
        only = {int(x) for x in args.runs.split(",")} if args.runs else None
        for name in args.suite or sorted(SUITES):
            run_suite(name, args.steps, rows_path, only)
            write_tables(rows_path, out_dir / "tables.md")
    write_tables(rows_path, out_dir / "tables.md")
    log(f"wrote {out_dir / 'tables.md'}")


if __name__ == "__main__":
    main()
