"""What exchanging costs a device's compute: seconds of compute lost per byte received in an all-gather.

On a CPU-only device the network stack runs on the cores that compute: the kernel's TCP and the virtual or
real NIC's work, GLOO's transport thread, the copies in and out of its buffers, and what their memory traffic
does to the compute thread's caches. The compute grid (profile/compute.py) times each layer with no exchange
running, so without this the cost model misses that time (docs/TESTBED.md, "Where a split rank's CPU goes":
a real 4-rank request spent ~40 % more CPU on the same layers). A device whose exchange runs elsewhere (a
Jetson computing on its GPU) measures ~0 here.

How (`exchange_cost_rank`, every rank of the session at once, as in a request): each rank times a fixed matrix
workload of the model's width on its compute thread, alone and with K all-gathers of `nbytes` per rank running
on the exchanger's background thread (the path a request's overlapped exchange takes, emulated link included),
in turns, `rounds` times. K is what the link carries in about 60 % of the workload's time, the same on every
rank. A rank's cost per byte is the median over rounds of (busy − alone) wall seconds over the bytes it received
from the all-gathers that finished while its workload ran (it sends about as many: GLOO's ring forwards them).
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from edgeprism.comm.exchange import Exchanger
from edgeprism.testbed.linktest import agree

DEFAULT_ROUNDS = 3
WORKLOAD_S = 1.5
"""The workload's target wall seconds alone on a device (the busy turn lasts about as long): long enough for
several of a slow link's all-gathers to finish inside it."""


def _workload(width: int, target_s: float):
    """A matrix workload of the model's width lasting about `target_s` here -> (run, alone seconds)."""
    torch.manual_seed(0)
    x, w = torch.randn(256, width), torch.randn(width, 4 * width)

    def run_once() -> None:
        torch.matmul(x, w)

    run_once()
    start = time.perf_counter()
    run_once()
    one_s = max(time.perf_counter() - start, 1e-6)
    reps = max(1, round(target_s / one_s))

    def run() -> float:
        start = time.perf_counter()
        for _ in range(reps):
            run_once()
        return time.perf_counter() - start

    return run, run()


def _exchange(exchanger: Exchanger, payload: torch.Tensor, sizes: list[int], count: int,
              finished: list[float]) -> None:
    """`count` all-gathers in a row, noting when each finished (the busy turn's background thread)."""
    for _ in range(count):
        exchanger.all_gather_bytes(payload, sizes, kind="probe")
        finished.append(time.perf_counter())


def exchange_cost_rank(ctx: Any, args: dict[str, Any], progress: Any = None) -> dict[str, Any] | None:
    """Rank function (`edgeprism.comm.job`; the cluster's "exchange_cost" job) over `ctx.group` (None: the
    default group): `args` {nbytes (per rank and all-gather), width (the model's hidden size), rounds (default
    3), workload_s (default `WORKLOAD_S`)}. Rank 0 returns {seconds_per_byte: per rank, alone_s, busy_s: per rank
    (median turns), allgathers, nbytes, received_bytes: per rank (median of the counted bytes)}."""
    nbytes, width = int(args["nbytes"]), int(args["width"])
    rounds = int(args.get("rounds", DEFAULT_ROUNDS))
    world, group = ctx.world_size, ctx.group
    exchanger = Exchanger(ctx)
    payload = torch.zeros(nbytes, dtype=torch.uint8)
    sizes = [nbytes] * world
    run, alone_s = _workload(width, float(args.get("workload_s", WORKLOAD_S)))
    dist.barrier(group=group)
    start = time.perf_counter()
    exchanger.all_gather_bytes(payload, sizes, kind="probe")
    allgather_s = agree(time.perf_counter() - start, dist.ReduceOp.MAX, group)
    count = int(agree(max(1.0, 0.6 * alone_s / max(allgather_s, 1e-6)), dist.ReduceOp.MIN, group))
    received_per_allgather = (world - 1) * nbytes
    alone, busy, costs, counted = [], [], [], []
    for _ in range(rounds):
        dist.barrier(group=group)
        alone.append(run())
        dist.barrier(group=group)
        finished: list[float] = []
        thread = threading.Thread(target=_exchange, args=(exchanger, payload, sizes, count, finished),
                                  name="exchange-cost", daemon=True)
        begin = time.perf_counter()
        thread.start()
        busy_s = run()
        end = begin + busy_s
        thread.join()
        received = received_per_allgather * sum(1 for t in finished if t <= end)
        busy.append(busy_s)
        counted.append(received)
        costs.append(max(0.0, busy_s - alone[-1]) / received if received else 0.0)
    mine = [statistics.median(costs), statistics.median(alone), statistics.median(busy),
            float(statistics.median(counted))]
    gathered = [torch.zeros(4, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor(mine, dtype=torch.float64), group=group)
    dist.barrier(group=group)
    if ctx.group_rank != 0:
        return None
    rows = [g.tolist() for g in gathered]
    return {"seconds_per_byte": [r[0] for r in rows], "alone_s": [r[1] for r in rows], "busy_s": [r[2] for r in rows],
            "received_bytes": [r[3] for r in rows], "allgathers": count, "nbytes": nbytes}


def seconds_per_byte(raw: dict[str, Any], speeds: tuple[float, ...]) -> float:
    """The profile's figure from `exchange_cost_rank`'s result: the median over ranks of each rank's seconds per
    byte at speed 1 (rank p's times its measured speed, as the cost model divides by it again)."""
    per_rank = [float(x) * (speeds[p] if p < len(speeds) else 1.0) for p, x in enumerate(raw["seconds_per_byte"])]
    return statistics.median(per_rank) if per_rank else 0.0


def message_bytes(batch: int, num_tokens: int, world_size: int, width: int) -> int:
    """A layer message of this size class: an equal share's tokens at one byte a value (int8 and its kin), kept
    within [64 KiB, 4 MiB] so that the test stays short on slow links and above per-message costs."""
    share = -(-num_tokens // max(1, world_size))
    return int(min(4 << 20, max(64 << 10, batch * share * width)))


__all__ = ["WORKLOAD_S", "exchange_cost_rank", "message_bytes", "seconds_per_byte"]
