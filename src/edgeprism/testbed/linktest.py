"""Measure what a link really delivers, through the same GLOO collectives the runtime uses.

Latency: the time of an all-gather of a tiny tensor, divided by its sequential hops (median, and the
lower quartile: on a shared host the upper samples hold waits for a busy core, which is not the link).
Bandwidth: a broadcast from rank 0 to rank 1 (one link direction) large enough to take ~0.25 s, minus
the small-message time. The same size is then all-gathered over the whole group: the rate one rank
pushes through its link while every link carries traffic both ways, which is what the runtime's
exchange gets (`allgather_bandwidth_bps`; lower than the link rate, see docs/TESTBED.md). Everything
goes through `EmulatedLink.before_collective` exactly as the runtime's collectives do, so the added
delay (and, on the loopback fallback, the rate) is part of what is measured.

Burst: a token-bucket link (the testbed's tbf, many shapers) lets a message that follows an idle gap
through at line rate up to its bucket depth. After an idle gap, a broadcast of `burst_probe_nbytes`
that takes t seconds reveals it: burst = probe - (t - latency) · rate (0 on a link without credit).
The runtime's per-layer messages follow compute gaps, so the cost model needs it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from edgeprism.testbed.emulation import EmulatedLink

__all__ = ["LinkMeasurement", "agree", "link_test_rank", "measure_link"]


@dataclasses.dataclass(frozen=True)
class LinkMeasurement:
    """One link test, as seen by this rank."""

    latency_s: float
    """One-way latency of one message hop: median small all-gather time / hops."""
    latency_min_s: float
    """The fastest small all-gather / hops: the link without the host's scheduling noise (on a shared
    machine the median also holds waits for a busy core, which is not the link)."""
    bandwidth_bps: float
    """Bits per second from rank 0 to rank 1 in a large broadcast (latency removed): one link direction."""
    allgather_bandwidth_bps: float
    """Bits per second one rank pushes through its link in a large all-gather over the whole group."""
    world_size: int
    hops: int
    """Sequential message steps of the ring all-gather (world_size - 1)."""
    latency_nbytes: int
    """Per-rank tensor size of the latency test."""
    bandwidth_nbytes: int
    """Per-rank tensor size of the bandwidth test."""
    latency_samples_s: tuple[float, ...]
    bandwidth_samples_s: tuple[float, ...]
    allgather_samples_s: tuple[float, ...]
    emulation: str
    """How the link is made, as the emulated link describes it ("none" without one)."""
    latency_low_s: float = float("nan")
    """Lower quartile of the small all-gathers / hops: what the profile uses (robust to a busy host)."""
    burst_bytes: float = 0.0
    """Bytes a message sends at line rate after an idle gap (token-bucket depth), median of the probes."""
    burst_samples_s: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["latency_samples_s"] = list(self.latency_samples_s)
        data["bandwidth_samples_s"] = list(self.bandwidth_samples_s)
        data["allgather_samples_s"] = list(self.allgather_samples_s)
        data["burst_samples_s"] = list(self.burst_samples_s)
        return data

    def __str__(self) -> str:
        return (
            f"link test over {self.world_size} ranks: latency {self.latency_s * 1e3:.3f} ms/hop "
            f"(lower quartile {self.latency_low_s * 1e3:.3f} ms), "
            f"bandwidth {self.bandwidth_bps / 1e6:.2f} Mbit/s one way, "
            f"{self.allgather_bandwidth_bps / 1e6:.2f} Mbit/s per rank in all-gather, "
            f"burst {self.burst_bytes / 1024:.1f} KiB [{self.emulation}]"
        )

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> LinkMeasurement:
        if isinstance(data, str):
            data = json.loads(data)
        data = dict(data)
        data["latency_samples_s"] = tuple(data["latency_samples_s"])
        data["bandwidth_samples_s"] = tuple(data["bandwidth_samples_s"])
        data["allgather_samples_s"] = tuple(data["allgather_samples_s"])
        data["burst_samples_s"] = tuple(data.get("burst_samples_s", ()))
        return cls(**data)


def _timed_all_gather(
    nbytes: int, world_size: int, link: EmulatedLink | None, group: dist.ProcessGroup | None
) -> float:
    send = torch.zeros(nbytes, dtype=torch.uint8)
    recv = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(world_size)]
    hops = world_size - 1
    start_s = time.perf_counter()
    if link is not None:
        # As the runtime: a ring all-gather puts hops x nbytes on this rank's link, in hops steps.
        link.before_collective(nbytes_sent=hops * nbytes, hops=hops)
    dist.all_gather(recv, send, group=group)
    return time.perf_counter() - start_s


def _timed_broadcast(
    nbytes: int, group_rank: int, link: EmulatedLink | None, group: dist.ProcessGroup | None
) -> float:
    """Rank 0 of `group` sends `nbytes` to the one other rank of `group`."""
    tensor = torch.zeros(nbytes, dtype=torch.uint8)
    start_s = time.perf_counter()
    if link is not None:
        link.before_collective(nbytes_sent=nbytes if group_rank == 0 else 0, hops=1)
    dist.broadcast(tensor, group_src=0, group=group)
    # The sender's broadcast returns once its bytes are in the socket buffer, long before they arrive;
    # a bare barrier (no emulated delay, ~0.3 ms) makes both ranks' clocks stop after the receiver has it.
    dist.barrier(group=group)
    return time.perf_counter() - start_s


def _idle_broadcast(nbytes: int, group_rank: int, link: EmulatedLink | None, group: dist.ProcessGroup | None,
                    idle_s: float) -> float:
    """A timed broadcast after both ranks left the link idle for `idle_s` (a token bucket refills)."""
    dist.barrier(group=group)
    time.sleep(idle_s)
    return _agree_max(_timed_broadcast(nbytes, group_rank, link, group), group)


def _agree_max(value_s: float, group: dist.ProcessGroup | None) -> float:
    """The largest of the ranks' values, so every rank takes the same branch (untimed)."""
    return agree(value_s, dist.ReduceOp.MAX, group)


def agree(value: float, op, group: dist.ProcessGroup | None = None) -> float:
    """`op` (a `dist.ReduceOp`) of the ranks' values, the same number on every rank (a tensor collective: no
    objects cross the wire)."""
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=op, group=group)
    return float(t.item())


def measure_link(
    group: dist.ProcessGroup | None = None,
    link: EmulatedLink | None = None,
    *,
    pair: dist.ProcessGroup | None = None,
    latency_nbytes: int = 64,
    latency_repeats: int = 20,
    bandwidth_start_nbytes: int = 256 * 1024,
    bandwidth_max_nbytes: int = 64 * 1024 * 1024,
    bandwidth_target_s: float = 0.25,
    bandwidth_repeats: int = 3,
    warmup: int = 3,
    burst_probe_nbytes: int = 512 * 1024,
    burst_idle_s: float = 0.1,
    burst_repeats: int = 3,
) -> LinkMeasurement:
    """Measure latency and bandwidth between the ranks of `group` (collective: every rank calls it).

    The bandwidth size doubles from `bandwidth_start_nbytes` until one all-gather takes at least
    `bandwidth_target_s` (or `bandwidth_max_nbytes` is reached), so slow and fast links both get a
    measurement long enough to be accurate and short enough to be cheap.

    `group` may be any process group, also one torch's default group does not know (the engine's lanes,
    `edgeprism.runtime.groups`); ranks are group-relative. `pair` is a group of `group`'s ranks 0 and 1
    for the one-way test (only those two use it); without one, a world of more than 2 makes it with
    `dist.new_group`, which needs the default group.
    """
    if group is None and not dist.is_initialized():
        raise RuntimeError("measure_link needs torch.distributed initialised (run it under torchrun) or a group")
    world_size = dist.get_world_size(group)
    if world_size < 2:
        raise ValueError(f"a link test needs at least 2 ranks; this group has {world_size}")
    if latency_repeats < 1 or bandwidth_repeats < 1:
        raise ValueError(f"repeats must be >= 1 (latency {latency_repeats}, bandwidth {bandwidth_repeats})")
    hops = world_size - 1

    for _ in range(warmup):
        _timed_all_gather(latency_nbytes, world_size, link, group)
    latency_samples = tuple(_timed_all_gather(latency_nbytes, world_size, link, group) for _ in range(latency_repeats))
    small_s = statistics.median(latency_samples)
    low_s = lower_quartile(latency_samples)
    # Every rank must take the same sizes below, so they decide on agreed (not local) times.
    small_agreed_s = _agree_max(small_s, group)

    # One link direction: broadcast between the group's first two ranks only.
    group_rank = group.rank() if group is not None else dist.get_rank()
    if world_size == 2:
        pair = group
    elif pair is None:
        pair = dist.new_group([dist.get_global_rank(group, 0) if group is not None else 0,
                               dist.get_global_rank(group, 1) if group is not None else 1])
    nbytes = bandwidth_start_nbytes
    bandwidth_samples: tuple[float, ...] = ()
    if group_rank < 2:
        while True:
            elapsed_s = _agree_max(_timed_broadcast(nbytes, group_rank, link, pair), pair)
            if elapsed_s >= bandwidth_target_s or nbytes * 2 > bandwidth_max_nbytes:
                break
            # Jump close to the target in one step once the time is above the noise.
            factor = 2 if elapsed_s < 4 * small_agreed_s else max(2, min(16, int(bandwidth_target_s / elapsed_s) + 1))
            nbytes = min(nbytes * factor, bandwidth_max_nbytes)
        bandwidth_samples = tuple(_timed_broadcast(nbytes, group_rank, link, pair) for _ in range(bandwidth_repeats))
        burst_probe_nbytes = min(burst_probe_nbytes, nbytes)  # at most the ~0.25 s bandwidth size
        burst_samples = tuple(_idle_broadcast(burst_probe_nbytes, group_rank, link, pair, burst_idle_s)
                              for _ in range(burst_repeats))
    else:
        burst_samples = ()
    # Every rank learns the size rank 0 settled on.
    size = torch.tensor([nbytes], dtype=torch.int64)
    dist.broadcast(size, group_src=0, group=group)
    nbytes = int(size.item())
    allgather_samples = tuple(_timed_all_gather(nbytes, world_size, link, group) for _ in range(bandwidth_repeats))

    def rate_bps(bits: float, samples: tuple[float, ...], fixed_s: float) -> float:
        if not samples:
            return float("nan")
        transfer_s = statistics.median(samples) - fixed_s
        return bits / transfer_s if transfer_s > 0 else float("inf")

    one_way_bps = rate_bps(nbytes * 8, bandwidth_samples, low_s / hops)
    return LinkMeasurement(
        latency_s=small_s / hops,
        latency_min_s=min(latency_samples) / hops,
        bandwidth_bps=one_way_bps,
        allgather_bandwidth_bps=rate_bps(hops * nbytes * 8, allgather_samples, low_s),
        world_size=world_size,
        hops=hops,
        latency_nbytes=latency_nbytes,
        bandwidth_nbytes=nbytes,
        latency_samples_s=latency_samples,
        bandwidth_samples_s=bandwidth_samples,
        allgather_samples_s=allgather_samples,
        emulation=link.describe() if link is not None else "none",
        latency_low_s=low_s / hops,
        burst_bytes=burst_estimate(burst_probe_nbytes, burst_samples, low_s / hops, one_way_bps),
        burst_samples_s=burst_samples,
    )


def lower_quartile(samples: tuple[float, ...]) -> float:
    ordered = sorted(samples)
    return ordered[(len(ordered) - 1) // 4]


def burst_estimate(probe_nbytes: int, samples: tuple[float, ...], latency_s: float, rate_bps: float) -> float:
    """Bytes that went through without waiting on the rate: probe - (t - latency) · rate, in [0, probe]."""
    if not samples or not (rate_bps > 0 and math.isfinite(rate_bps)):
        return 0.0
    waited_bytes = (statistics.median(samples) - latency_s) * rate_bps / 8.0
    return float(min(probe_nbytes, max(0.0, probe_nbytes - waited_bytes)))


def link_test_rank(ctx: Any, args: dict[str, Any], progress: Any) -> dict[str, Any] | None:
    """Rank function (`edgeprism.comm.job`) of the link test, on every rank of the default group:
    rank 0 returns the measurement as JSON. `args`: latency_repeats (20), bandwidth_target_s (0.25)."""
    measurement = measure_link(link=ctx.link, latency_repeats=int(args.get("latency_repeats", 20)),
                               bandwidth_target_s=float(args.get("bandwidth_target_s", 0.25)))
    dist.barrier()
    return measurement.to_json() if ctx.is_root else None
