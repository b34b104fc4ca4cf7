"""What hiding the exchange behind compute buys: the same requests through the position-wise split with the overlap
off, on, and on with micro-batches, interleaved request by request on one job's ranks, beside rank 0 alone
(`scripts/bench_overlap.py`, `scripts/bench_speed.py`: their shared options are `add_overlap_arguments`, their
shared run `run_overlap`)."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from edgeprism.bench.order import round_order
from edgeprism.comm.context import DistContext
from edgeprism.comm.launch import JobSession
from edgeprism.compress.registry import get_codec
from edgeprism.models.loading import load_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.partition.transform import PositionWise
from edgeprism.testbed.presets import get_preset

VARIANTS: dict[str, tuple[bool, int, int]] = {
    "plain": (False, 1, 1), "overlap": (True, 1, 1), "mb2": (True, 2, 1), "mb3": (True, 3, 1), "mb4": (True, 4, 1),
    "mb8": (True, 8, 1), "chunk2": (True, 1, 2), "chunk3": (True, 1, 3), "chunk4": (True, 1, 4)}
"""name -> (overlap, micro_batches, token chunks where partition/overlapped.py's rule allows them: a codec that
splits by token, one micro-batch); "local" is rank 0 running the reference model alone."""


def overlap_rank(ctx: DistContext, args: dict[str, Any], progress=None) -> dict | None:
    """Rank function (`edgeprism.comm.job`): args {model, codec (one name, or several comma-separated: every
    variant then runs with each, named "variant codec"), batches, repeats, warmup, variants (default overlap,
    plain; any of VARIANTS and "local")}. Rank 0 returns per batch each variant's latencies (s), its paired ratios
    over "plain" (same round, one codec) and the median per-layer timeline totals of rank 0 (s)."""
    model = load_model(args["model"], seed=0).to(ctx.device)
    codecs = [get_codec(name) for name in args["codec"].split(",")]
    wanted = list(args.get("variants") or ["overlap", "plain"])
    variants = {name if len(codecs) == 1 else f"{name} {codec.name}":
                PositionWise(model, ctx, codec, overlap=VARIANTS[name][0], micro_batches=VARIANTS[name][1],
                             token_chunks=VARIANTS[name][2])
                for name in wanted if name != "local" for codec in codecs}
    names = (["local"] if "local" in wanted else []) + list(variants)
    out: dict[str, Any] = {"model": args["model"], "codec": ",".join(c.name for c in codecs),
                           "world_size": ctx.world_size, "points": []}
    for batch in args["batches"]:
        inputs = synthetic_inputs(model.config, batch, seed=batch) if ctx.is_root else None
        times: dict[str, list[float]] = {name: [] for name in names}
        timelines: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        for repeat in range(-args["warmup"], args["repeats"]):
            for name in round_order(names, repeat):  # interleaved, a new order per round (bench/order.py)
                start, cpu_start, main_start = time.perf_counter(), time.process_time(), time.thread_time()
                if name == "local":
                    if ctx.is_root:
                        with torch.no_grad():
                            model(inputs)
                else:
                    variants[name].forward(inputs)
                if repeat >= 0:
                    times[name].append(time.perf_counter() - start)
                    cpu[name].append((time.process_time() - cpu_start, time.thread_time() - main_start))
                    if name in variants:
                        timelines[name].append(variants[name].timeline.totals())
        if ctx.is_root:
            point: dict[str, Any] = {"batch": batch}
            for name in names:
                point[f"{name}_s"] = times[name]
                point[f"{name}_median_s"] = statistics.median(times[name])
                point[f"{name}_cpu_s"] = statistics.median(c[0] for c in cpu[name])
                point[f"{name}_main_thread_cpu_s"] = statistics.median(c[1] for c in cpu[name])
                if name in timelines:
                    point[f"{name}_timeline_s"] = {key: statistics.median(t[key] for t in timelines[name])
                                                   for key in timelines[name][0]}
                if name != "plain" and "plain" in times:
                    ratios = [a / b for a, b in zip(times[name], times["plain"])]
                    point[f"{name}_over_plain_median"] = statistics.median(ratios)
                    point[f"{name}_over_plain_ratios"] = ratios
            if "overlap" in times and "plain" in times:  # the keys scripts/bench_overlap.py always printed
                point["ratios"] = point["overlap_over_plain_ratios"]
            out["points"].append(point)
            if progress:
                progress(f"batch {batch}: " + ", ".join(f"{name} {point[f'{name}_median_s'] * 1e3:.1f} ms"
                                                         for name in names))
    torch.distributed.barrier()
    return out if ctx.is_root else None


def add_overlap_arguments(parser: argparse.ArgumentParser, codec: str, repeats: int) -> None:
    """The options of an overlap run (`run_overlap`), with the script's default codec and repeats."""
    parser.add_argument("--model", default="vit-base-patch16-224")
    parser.add_argument("--link", default="wifi4")
    parser.add_argument("--codec", default=codec)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backend", default="auto", choices=("auto", "netns", "loopback"))
    parser.add_argument("--json", action="store_true")


def run_overlap(args: argparse.Namespace, variants: Sequence[str] | None = None,
                on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """`overlap_rank` on 2 emulated devices of one core over the link preset `args.link`, with the options of
    `add_overlap_arguments` (`variants`: None runs overlap and plain; `args.speeds`, where given: one device per
    speed, each a CPU quota of that many cores). Its result, plus the job's `emulation` and the host's load
    averages before and after (`load_avg_before`, `load_avg_after`): a busy host makes every number slower and the
    ratios noisier."""
    load_before = os.getloadavg()
    job = {"model": args.model, "codec": args.codec, "repeats": args.repeats, "warmup": args.warmup,
           "batches": [int(b) for b in args.batches.split(",")]}
    if variants is not None:
        job["variants"] = list(variants)
    speeds = getattr(args, "speeds", None)
    with JobSession(len(speeds) if speeds else 2, get_preset(args.link), backend=args.backend, timeout_s=1800,
                    speeds=speeds) as session:
        result = session.run(overlap_rank, job, on_progress=on_progress)
        result["emulation"] = session.emulation
    result["load_avg_before"], result["load_avg_after"] = load_before, os.getloadavg()
    return result


__all__ = ["VARIANTS", "add_overlap_arguments", "overlap_rank", "run_overlap"]
