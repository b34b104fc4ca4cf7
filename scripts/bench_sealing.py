"""Sealed vs plain data lanes: what sealing costs a distributed request over a testbed link, per codec.

Two hosts of the kernel testbed (root) over `--link` (default wifi4); one job (`edgeprism.bench.sealing`)
runs each codec's request at batch 1 sealed and unsealed, interleaved, alternating which goes first,
`--repeats` rounds after `--warmup`. Rows go to OUT/rows.jsonl; the table of medians (latency, the
median of the per-round sealed/unsealed ratios, bytes, seconds spent sealing) to OUT/table.md and stdout,
with the host's load average before and after.

    python scripts/bench_sealing.py --model vit-base-patch16-224 --codecs fp32,int8,sm16+int8 --repeats 10 \\
        --out benchmarks/results/sealing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch

from edgeprism.bench.sealing import sealing_rank
from edgeprism.comm.launch import run_job
from edgeprism.testbed.net import Testbed
from edgeprism.testbed.presets import get_preset


def table(rows: list[dict], codecs: list[str]) -> list[str]:
    lines = ["| codec | plain median (ms) | sealed median (ms) | sealed / plain (median of rounds) | "
             "layer bytes plain | layer bytes sealed | sealing (ms, rank 0) |", "|---|---|---|---|---|---|---|"]
    for codec in codecs:
        plain = {r["round"]: r for r in rows if r["codec"] == codec and not r["sealed"]}
        sealed = {r["round"]: r for r in rows if r["codec"] == codec and r["sealed"]}
        ratios = [sealed[i]["latency_s"] / plain[i]["latency_s"] for i in plain if i in sealed]
        med = lambda rs, key: statistics.median(r[key] for r in rs.values())
        lines.append(f"| {codec} | {med(plain, 'latency_s') * 1e3:.1f} | {med(sealed, 'latency_s') * 1e3:.1f} | "
                     f"{statistics.median(ratios):.3f} (IQR {_iqr(ratios)}) | {int(med(plain, 'layer_nbytes'))} | "
                     f"{int(med(sealed, 'layer_nbytes'))} | {med(sealed, 'sealing_s') * 1e3:.2f} |")
    return lines


def _iqr(values: list[float]) -> str:
    if len(values) < 4:
        return "n/a"
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:.3f}-{q[2]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-base-patch16-224")
    parser.add_argument("--codecs", default="fp32,int8,sm16+int8")
    parser.add_argument("--link", default="wifi4")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (text models)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/sealing")
    args = parser.parse_args()
    codecs = [c for c in args.codecs.split(",") if c]
    load_before = os.getloadavg()
    with Testbed(2, get_preset(args.link), backend="netns") as testbed:
        rows = run_job(2, sealing_rank, {"model": args.model, "codecs": codecs, "batch": 1, "seq_len": args.seq_len,
                                         "warmup": args.warmup, "repeats": args.repeats}, testbed=testbed,
                       timeout_s=3600, on_progress=lambda line: print(line, flush=True))
    load_after = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    facts = {"model": args.model, "link": args.link, "batch": 1, "host": platform.node(), "cpus": os.cpu_count(),
             "torch": torch.__version__, "load_before": load_before, "load_after": load_after}
    with open(out / "rows.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps({**facts, **row}) + "\n")
    lines = [f"{args.model}, batch 1, 2 hosts over {args.link}, {args.repeats} interleaved rounds "
             f"(+{args.warmup} warm-up); load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, "
             f"{os.cpu_count()} cores", "", *table(rows, codecs)]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
