"""Link profiling, and the place where a profiling run's distributed jobs go.

A `LinkSession` is one group of `world_size` emulated devices for the whole profiling run: testbed
hosts joined by an emulated link when a link is given (`edgeprism.testbed`: netns + tbf as root,
else the loopback fallback with the link emulated in the transport), or plain local workers on
loopback when none is. The link test (`edgeprism.testbed.linktest`) and the validation runs both go
through it, so validation sees exactly the link the profile measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from edgeprism.comm.launch import JobSession, run_job
from edgeprism.profile.schema import LinkMeasurement
from edgeprism.testbed import linktest
from edgeprism.testbed.net import Testbed


class LinkSession(JobSession):
    """`world_size` devices over `link` (None: unshaped loopback) — a context manager that cleans up.
    Jobs run on it with `run(fn, args, ...)` (`comm.launch.JobSession`); this adds the link test."""

    def measure_link(self) -> tuple[LinkMeasurement, dict[str, Any]]:
        """The link test through the runtime's own collectives → (the profile's link section, raw result)."""
        raw = self.run(linktest.link_test_rank, {})
        return link_section(raw, self.emulation, getattr(self.testbed, "medium", "switched")), raw


def run_link_test(testbed: Testbed, timeout_s: float = 180.0, latency_repeats: int = 20) -> linktest.LinkMeasurement:
    """The link test on every host of `testbed` (one rank each, through torchrun) → rank 0's measurement."""
    raw = run_job(testbed.num_hosts, linktest.link_test_rank, {"latency_repeats": latency_repeats},
                  testbed=testbed, timeout_s=timeout_s)
    return linktest.LinkMeasurement.from_json(raw)


def link_section(raw: Mapping[str, Any], emulation: str = "", medium: str = "switched") -> LinkMeasurement:
    """The profile's link from a link test: the per-rank all-gather rate (what every layer's exchange
    gets, with every link busy both ways) and the one-hop latency of a small all-gather. On a shared medium
    the bandwidth is the one channel's rate (the one-way broadcast), which the cost model divides among the
    ranks' transfers (`plan.cost`: P x the switched all-gather time; docs/TESTBED.md measured it)."""
    allgather_bps = float(raw["allgather_bandwidth_bps"])
    one_way_bps = float(raw["bandwidth_bps"])
    if medium == "shared":
        allgather_bps = one_way_bps
    if not (allgather_bps > 0 and allgather_bps != float("inf")):
        raise ValueError(f"the link test measured no usable all-gather rate ({allgather_bps} bit/s); "
                         "the link is too fast for its sizes — re-run with a slower --link or longer target")
    # The lower quartile, not the median: on a shared host the upper samples hold waits for a busy
    # core (a rank woken late), which the runtime pays as compute skew, not as link latency.
    latency_s = float(raw.get("latency_low_s", float("nan")))
    if not math.isfinite(latency_s):
        latency_s = float(raw["latency_s"])
    burst_bytes = float(raw.get("burst_bytes", 0.0))
    method = (f"edgeprism.testbed.linktest over {raw['world_size']} ranks, GLOO: latency = lower quartile of "
              f"{raw['latency_nbytes']} B all-gathers / {raw['hops']} hop(s) (median "
              f"{float(raw['latency_s']) * 1e3:.3g} ms); bandwidth = per-rank all-gather rate "
              f"at {raw['bandwidth_nbytes']} B ({allgather_bps / 1e6:.2f} Mbit/s; one-way broadcast "
              f"{one_way_bps / 1e6:.2f} Mbit/s); burst = bytes a broadcast after an idle gap sends at line rate "
              f"({burst_bytes / 1024:.1f} KiB)"
              + ("; SHARED medium: bandwidth = the one channel's one-way rate" if medium == "shared" else ""))
    described = raw.get("emulation", "none")
    return LinkMeasurement(latency_s=latency_s, bandwidth_bps=allgather_bps, medium=medium,  # type: ignore[arg-type]
                           method=method, emulation=f"{emulation} [{described}]" if emulation else "",
                           burst_bytes=burst_bytes)


__all__ = ["LinkSession", "link_section", "run_link_test"]
