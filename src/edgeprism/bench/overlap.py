"""What hiding the exchange behind compute buys: the same requests through the position-wise split with the overlap
off, on, and on with micro-batches, interleaved request by request on one job's ranks, beside rank 0 alone
(`scripts/bench_overlap.py`, `scripts/bench_speed.py`)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from edgeprism.comm.context import DistContext
from edgeprism.compress.registry import get_codec
from edgeprism.models.loading import load_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.partition.transform import PositionWise

VARIANTS: dict[str, tuple[bool, int]] = {"plain": (False, 1), "overlap": (True, 1), "mb2": (True, 2)}
"""name -> (overlap, micro_batches); "local" is rank 0 running the reference model alone."""


def overlap_rank(ctx: DistContext, args: dict[str, Any], progress=None) -> dict | None:
    """Rank function (`edgeprism.comm.job`): args {model, codec, batches, repeats, warmup, variants (default
    overlap, plain; any of VARIANTS and "local")}. Rank 0 returns per batch each variant's latencies (s), its
    paired ratios over "plain" (same round) and the median per-layer timeline totals of rank 0 (s)."""
    model = load_model(args["model"], seed=0).to(ctx.device)
    codec = get_codec(args["codec"])
    names = list(args.get("variants") or ["overlap", "plain"])
    variants = {name: PositionWise(model, ctx, codec, overlap=VARIANTS[name][0], micro_batches=VARIANTS[name][1])
                for name in names if name != "local"}
    out: dict[str, Any] = {"model": args["model"], "codec": codec.name, "world_size": ctx.world_size, "points": []}
    for batch in args["batches"]:
        inputs = synthetic_inputs(model.config, batch, seed=batch) if ctx.is_root else None
        times: dict[str, list[float]] = {name: [] for name in names}
        timelines: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for repeat in range(-args["warmup"], args["repeats"]):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:  # interleaved, each variant first in turn
                start = time.perf_counter()
                if name == "local":
                    if ctx.is_root:
                        with torch.no_grad():
                            model(inputs)
                else:
                    variants[name].forward(inputs)
                if repeat >= 0:
                    times[name].append(time.perf_counter() - start)
                    if name in variants:
                        timelines[name].append(variants[name].timeline.totals())
        if ctx.is_root:
            point: dict[str, Any] = {"batch": batch}
            for name in names:
                point[f"{name}_s"] = times[name]
                point[f"{name}_median_s"] = statistics.median(times[name])
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


__all__ = ["VARIANTS", "overlap_rank"]
