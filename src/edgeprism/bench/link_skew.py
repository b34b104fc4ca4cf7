"""What the live link estimate reads from skewed all-gathers (issue 17; `scripts/bench_link_skew.py`).

On the testbed's ranks, per skew bound and mode, `layers` all-gathers of `nbytes` per rank, each rank issuing each
one after a random lead of up to the bound (a sleep, or busy compute with the exchange in the background beside
more compute: the engine's overlapped path). Rank 0 reports, per case, what `runtime.telemetry.observations` reads
(the least rank time per layer) and what the pairing rule used before read (the mean of the least and greatest
time over layers that looked balanced), beside the link's wire model: a reading that grows with the skew reads
compute skew as link time.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import torch

from edgeprism.comm.context import DistContext
from edgeprism.comm.exchange import Exchanger
from edgeprism.runtime.groups import start_recording
from edgeprism.runtime.telemetry import RankTelemetry, observations, telemetry


def paired_seconds(per_rank: list[RankTelemetry], num_layers: int) -> float | None:
    """The rule before (issue 17), for comparison: the median over layers where the soonest rank waited at least
    0.1 x the longest wait (or no wait passed 1 ms, or the times were within 10 %) of (least + greatest time) / 2."""
    found = []
    for i in range(num_layers):
        times = [(r.layers[i].delay_s + r.layers[i].wait_s, r.layers[i].wait_s) for r in per_rank]
        (soonest, soonest_wait), (longest, longest_wait) = min(times), max(times)
        if longest_wait <= 1e-3 or soonest_wait >= 0.1 * longest_wait or longest - soonest <= 0.1 * longest:
            found.append((soonest + longest) / 2)
    return statistics.median(found) if found else None


def _busy(seconds: float) -> None:
    a = torch.randn(128, 128)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = (a @ a).clamp_(-1, 1)


def link_skew_rank(ctx: DistContext, args: dict[str, Any], progress=None) -> list[dict] | None:
    """Rank function (`edgeprism.comm.job`): args {nbytes, layers, skews (s), modes ("sync", "overlap"), compute_s
    (the overlapped mode's compute beside each exchange), seed}. Rank 0 returns one row per (skew, mode)."""
    k, nbytes, layers = ctx.world_size, int(args["nbytes"]), int(args["layers"])
    exchanger = Exchanger(ctx)
    payload = torch.zeros(nbytes, dtype=torch.uint8)
    rng = random.Random(int(args.get("seed", 0)) * 1000 + ctx.group_rank)
    exchanger.all_gather_bytes(payload, [nbytes] * k)  # connections up before anything is timed
    rows = []
    try:
        for skew_s in args["skews"]:
            for mode in args["modes"]:
                stats = start_recording(exchanger)
                start = time.perf_counter()
                for _ in range(layers):
                    if mode == "sync":
                        time.sleep(rng.uniform(0.0, skew_s))
                        exchanger.all_gather_bytes(payload, [nbytes] * k)
                        continue
                    _busy(rng.uniform(0.0, skew_s))
                    pending = exchanger.start_all_gather_bytes(payload, [nbytes] * k)
                    _busy(float(args["compute_s"]))
                    pending.wait()
                per_rank = telemetry(exchanger, stats, time.perf_counter() - start, layers)
                if not ctx.is_root:
                    continue
                (least,) = [o.seconds for o in observations(per_rank, k, layers)]
                row = {"world_size": k, "mode": mode, "skew_s": skew_s, "nbytes": nbytes, "least_s": least,
                       "paired_s": paired_seconds(per_rank, layers),
                       "compute_s": [r.compute_s for r in per_rank], "hidden_s": [r.hidden_s for r in per_rank]}
                rows.append(row)
                if progress:
                    progress(f"k={k} {mode} skew<={skew_s:g} s: least {least * 1e3:.1f} ms")
    finally:
        exchanger.close()
    return rows if ctx.is_root else None


__all__ = ["link_skew_rank", "paired_seconds"]
