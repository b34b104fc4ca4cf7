"""What overlapping the exchange with compute buys: the same requests through the position-wise split with
the overlap on and off, interleaved request by request on one job's ranks (`scripts/bench_overlap.py`)."""

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


def overlap_rank(ctx: DistContext, args: dict[str, Any], progress=None) -> dict | None:
    """Rank function (`edgeprism.comm.job`): args {model, codec, batches, repeats, warmup}. Rank 0 returns per
    batch the latencies (s) of each variant, and their paired ratios (on / off, same round)."""
    model = load_model(args["model"], seed=0).to(ctx.device)
    codec = get_codec(args["codec"])
    variants = {name: PositionWise(model, ctx, codec, overlap=name == "overlap") for name in ("overlap", "plain")}
    out: dict[str, Any] = {"model": args["model"], "codec": codec.name, "world_size": ctx.world_size, "points": []}
    for batch in args["batches"]:
        inputs = synthetic_inputs(model.config, batch, seed=batch) if ctx.is_root else None
        times: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(-args["warmup"], args["repeats"]):
            order = list(variants) if repeat % 2 == 0 else list(reversed(variants))  # interleaved, alternating
            for name in order:
                start = time.perf_counter()
                variants[name].forward(inputs)
                if repeat >= 0:
                    times[name].append(time.perf_counter() - start)
        if ctx.is_root:
            ratios = [on / off for on, off in zip(times["overlap"], times["plain"])]
            point = {"batch": batch, **{f"{name}_s": times[name] for name in variants},
                     "overlap_median_s": statistics.median(times["overlap"]),
                     "plain_median_s": statistics.median(times["plain"]),
                     "overlap_over_plain_median": statistics.median(ratios), "ratios": ratios}
            out["points"].append(point)
            if progress:
                progress(f"batch {batch}: overlap {point['overlap_median_s'] * 1e3:.1f} ms, plain "
                         f"{point['plain_median_s'] * 1e3:.1f} ms, paired ratio "
                         f"{point['overlap_over_plain_median']:.3f}")
    torch.distributed.barrier()
    return out if ctx.is_root else None


__all__ = ["overlap_rank"]
