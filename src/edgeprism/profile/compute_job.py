"""The compute-profiling job: every device times its share of the grid at the same time, as requests run.

`compute_rank` is its rank function (`edgeprism.comm.job`), run on every device of a `LinkSession`
(testbed hosts or local processes, each pinned to its own cores) by `measure_on_session`.
Distributed shapes are timed on all ranks at once, a barrier before every call, so each rank's time
includes whatever running next to the others costs on this host (shared memory bandwidth, and here
other work on the same cores). Local shapes and the request overhead are timed on rank 0 alone while
the others wait, as a local request runs. Rank 0 returns every rank's timings and reports one progress
line per timed call.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from edgeprism.comm.context import DistContext
from edgeprism.comm.job import Progress
from edgeprism.models.base import ReferenceModel
from edgeprism.models.loading import load_model
from edgeprism.profile.compute import (
    OverheadFit,
    ProgressFn,
    Shape,
    block_call,
    compute_grid,
    fit_compute,
    overhead_call,
    time_interleaved,
)
from edgeprism.profile.schema import ComputeTable

log = logging.getLogger(__name__)


def measure_on_session(session, model: str, checkpoint: str | None, seed: int, token_counts: Sequence[int],
                       batches: Sequence[int], codecs: Sequence, device: str = "cpu", warmup: int = 1,
                       repeats: int = 3, num_layers: int = 1, progress: ProgressFn | None = None,
                       ) -> tuple[ComputeTable, OverheadFit, list[Shape], tuple[float, ...], dict[str, Any]]:
    """Time the compute grid on every device of `session` → (table, overhead, shapes, relative speed per
    rank, raw result). Shared shapes: see `critical_path`; local shapes and overhead: rank 0 alone."""
    shapes = compute_grid(token_counts, batches, session.world_size, codecs)
    overhead_points = [(b, n) for n in token_counts for b in batches]
    plan = {"model": model, "checkpoint": checkpoint, "seed": seed, "device": device,
            **grid_plan(shapes, overhead_points, warmup, repeats)}

    def on_line(line: str) -> None:
        done, total, label = line.split("\t", 2)
        if progress:
            progress(int(done), int(total), label)

    raw = session.run(compute_rank, plan, on_progress=on_line, dist_backend="gloo", device=device)
    table, overhead, speeds = fit_result(raw, shapes, overhead_points, num_layers)
    return table, overhead, shapes, speeds, raw


def grid_plan(shapes: Sequence[Shape], overhead_points: Sequence[tuple[int, int]], warmup: int,
              repeats: int) -> dict[str, Any]:
    """The part of a compute plan `run_plan` times: the grid, the overhead points, warm-up and repeats."""
    return {"warmup": warmup, "repeats": repeats,
            "shapes": [[s.batch, s.num_own_tokens, s.num_kv_vectors, s.kind] for s in shapes],
            "overhead": [list(p) for p in overhead_points]}


def fit_result(raw: dict[str, Any], shapes: Sequence[Shape], overhead_points: Sequence[tuple[int, int]],
               num_layers: int) -> tuple[ComputeTable, OverheadFit, tuple[float, ...]]:
    """(table, overhead, relative speed per rank) from rank 0's result of `run_plan`."""
    shared = [Shape(**s) for s in raw["shared"]]
    alone = [Shape(**s) for s in raw["alone"]]
    speeds, shared_s = critical_path(raw["shared_samples_s"])
    timed = dict(zip(shared, shared_s)) | dict(zip(alone, raw["alone_s"]))
    table, overhead = fit_compute(shapes, [timed[s] for s in shapes], overhead_points, raw["overhead_s"], num_layers)
    return table, overhead, speeds


def critical_path(samples_per_rank: Sequence[Sequence[Sequence[float]]]) -> tuple[tuple[float, ...], list[float]]:
    """(relative speed per rank, seconds per shared shape) from every rank's samples [rank][shape][pass].

    Speed of rank p: median over shapes of rank 0's median time / rank p's. A distributed layer takes
    as long as its slowest rank, call by call, so each shape's time is the median over passes of the
    largest speed-normalised time over ranks: the jitter of running side by side is in it, the steady
    difference between devices is left to the speeds (the cost model divides by them)."""
    ranks = len(samples_per_rank)
    medians = [[statistics.median(passes) for passes in rank] for rank in samples_per_rank]
    speeds = tuple(1.0 if p == 0 or not medians[0] else
                   round(statistics.median(t0 / tp for t0, tp in zip(medians[0], medians[p]) if tp > 0), 3)
                   for p in range(ranks))
    shape_s = []
    for c in range(len(medians[0])):
        passes = len(samples_per_rank[0][c])
        slowest = [max(samples_per_rank[p][c][r] * speeds[p] for p in range(ranks)) for r in range(passes)]
        shape_s.append(statistics.median(slowest))
    return speeds, shape_s


def run_plan(plan: dict[str, Any], group_rank: int, world_size: int, device: torch.device,
             *, group=None, model: ReferenceModel | None = None,
             progress: ProgressFn | None = None) -> dict[str, Any] | None:
    """Collective over `group` (default: the default group; ranks group-relative): time the plan's grid.
    Returns rank 0's result (every rank's shared samples), None on the others. `model`: already loaded
    (default: load the plan's); `progress(done, total, label)` reports on rank 0."""
    if model is None:
        model = load_model(plan["model"], plan.get("checkpoint"), seed=plan.get("seed", 0))
    model = model.to(device).eval()
    shapes = [Shape(*s) for s in plan["shapes"]]
    shared = [s for s in shapes if s.kind != "local"]
    alone = [s for s in shapes if s.kind == "local"]
    overhead_points = [tuple(p) for p in plan["overhead"]]
    warmup, repeats = int(plan["warmup"]), int(plan["repeats"])
    total = (len(shared) + len(alone) + len(overhead_points)) * repeats
    is_root = group_rank == 0

    def reporter(offset: int, labels: list[str]):
        def step(done: int, seconds: float) -> None:
            text = f"{labels[(done - 1) % len(labels)]} {seconds * 1e3:.1f} ms"
            if is_root and progress:
                progress(offset + done, total, text)
        return step

    def barrier() -> None:
        if world_size > 1:
            dist.barrier(group=group)

    def label(s: Shape) -> str:
        return f"block B={s.batch} n={s.num_own_tokens} kv={s.num_kv_vectors}"

    calls = [block_call(model, s, device) for s in shared]
    raw: list[list[float]] = []
    time_interleaved(calls, device, warmup, repeats, reporter(0, [label(s) + " (all ranks)" for s in shared]),
                     before=barrier, samples_out=raw)
    del calls
    alone_s: list[float] = []
    overhead_s: list[float] = []
    if is_root:
        calls = [block_call(model, s, device) for s in alone]
        alone_s = time_interleaved(calls, device, warmup, repeats,
                                   reporter(len(shared) * repeats, [label(s) + " (rank 0 alone)" for s in alone]))
        calls = [overhead_call(model, b, n, device) for b, n in overhead_points]
        overhead_s = time_interleaved(calls, device, warmup, repeats,
                                      reporter((len(shared) + len(alone)) * repeats,
                                               [f"embed+head B={b} N={n}" for b, n in overhead_points]))
        del calls
    barrier()  # the others wait here (blocked, not spinning) while rank 0 runs alone
    mine = torch.tensor(raw, dtype=torch.float64).reshape(len(shared), repeats)  # (calls, repeats)
    per_rank = [torch.zeros_like(mine) for _ in range(world_size)]
    if world_size > 1:
        dist.all_gather(per_rank, mine, group=group)
    else:
        per_rank = [mine]
    if not is_root:
        return None
    return {"shared": [s.__dict__ for s in shared], "shared_samples_s": [t.tolist() for t in per_rank],
            "alone": [s.__dict__ for s in alone], "alone_s": alone_s,
            "overhead": [list(p) for p in overhead_points], "overhead_s": overhead_s,
            "cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [],
            "torch_threads": torch.get_num_threads()}


def compute_rank(ctx: DistContext, args: dict[str, Any], progress: Progress) -> dict[str, Any] | None:
    """Rank function (`edgeprism.comm.job`): `args` is a compute plan (model, checkpoint, seed, device and
    `grid_plan`'s keys); rank 0 returns `run_plan`'s result and reports 'done<TAB>total<TAB>label' lines."""
    return run_plan(args, ctx.group_rank, ctx.world_size, ctx.device,
                    progress=lambda done, total, label: progress(f"{done}\t{total}\t{label}"))
