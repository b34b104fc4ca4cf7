"""Online per-device compute speed: noticing a straggler from the ranks' own timings, and taking it back.

After every distributed request each plan rank reports its wall, staging, collective and emulated-delay
seconds (`telemetry.RankTelemetry`); what is left is the rank's compute. The cost model says what that
compute would take at speed 1.0 for the rank's tokens (`plan.cost.rank_compute_s`), so

    observed speed_p = predicted_p(speed 1) / measured compute_p.

A device is compared with *itself*: its baseline is what it showed in its first observations (the profile
may be off for all ranks alike, which the local-vs-distributed bias already handles), and its scale is
the current observed speed over that baseline: 1.0 while it runs as it did, 0.25 once it runs at a
quarter. `LinkEstimate.device_speed_scale` carries the scales to the planner, which then re-shares the
tokens or leaves the device out.

A slowdown is a step, like a link change: an observation off the current estimate by more than
`change_factor` replaces it at once (the planner reacts on the next request); smaller changes are
averaged in (EWMA in log). A device the planner left out gives no more observations, so after
`retry_after` requests without one its scale is moved halfway (in log) back to its baseline: the planner
tries it again with a moderate share, and either it is restored (the observation jumps back: taken
back) or the request shows it slow again (left out again, having cost a moderate share, not a full one). Pure
bookkeeping: no clock, no I/O; the engine feeds it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

log = logging.getLogger(__name__)

MIN_COMPUTE_S = 1e-3
"""Compute times below this (a rank with a token or two) are too noisy to judge a device by."""
DEAD_BAND = 1.3
"""Scales within this factor of 1.0 are reported as 1.0: a shared host's noise should not move the shares
(on this project's busy 2-core VM every device's scale wandered by about ±30 % with the machine's load,
docs/TESTBED.md; a straggler at a quarter of its speed is far outside)."""


class ComputeSpeedEstimator:
    """Live speed scale per rank (rank order, `world_size` values; 1.0 = as the device first ran)."""

    def __init__(self, world_size: int, alpha: float = 0.5, change_factor: float = 1.6, baseline_samples: int = 2,
                 retry_after: int = 4, bounds: tuple[float, float] = (0.02, 4.0)) -> None:
        if world_size < 1 or not (0 < alpha <= 1) or change_factor <= 1 or baseline_samples < 1 or retry_after < 1:
            raise ValueError(f"need world_size >= 1, 0 < alpha <= 1, change_factor > 1, baseline_samples >= 1, "
                             f"retry_after >= 1; got {world_size}, {alpha}, {change_factor}, {baseline_samples}, "
                             f"{retry_after}")
        self.world_size = world_size
        self.alpha = alpha
        self.change_factor = change_factor
        self.baseline_samples = baseline_samples
        self.retry_after = retry_after
        self.bounds = bounds
        self._baseline: list[list[float]] = [[] for _ in range(world_size)]
        """Log observed speeds of each rank's first observations."""
        self._log_speed: list[float | None] = [None] * world_size
        self._unseen: list[int] = [0] * world_size
        """Requests since each rank was last observed."""
        self.changes = 0

    def _base(self, rank: int) -> float | None:
        samples = self._baseline[rank]
        if len(samples) < self.baseline_samples:
            return None
        return sorted(samples)[len(samples) // 2]

    def update(self, ranks: Sequence[int], predicted_s: Sequence[float], measured_s: Sequence[float]) -> None:
        """One request: the plan's ranks, their predicted compute at speed 1.0 and their measured compute.
        Every rank not in `ranks` goes one request longer unobserved."""
        observed = set()
        for rank, predicted, measured in zip(ranks, predicted_s, measured_s):
            if measured < MIN_COMPUTE_S or predicted <= 0 or not math.isfinite(measured):
                continue
            observed.add(rank)
            self._observe(rank, math.log(predicted / measured))
        for rank in range(self.world_size):
            if rank in observed:
                self._unseen[rank] = 0
                continue
            self._unseen[rank] += 1
            if self._unseen[rank] >= self.retry_after and self.scale(rank) != 1.0:
                log.info("rank %d unobserved for %d requests at scale %.3g: trying it again halfway to its "
                         "baseline", rank, self._unseen[rank], self.scale(rank))
                base, current = self._base(rank), self._log_speed[rank]
                self._log_speed[rank] = base if base is None or current is None else (base + current) / 2
                self._unseen[rank] = 0

    def _observe(self, rank: int, log_speed: float) -> None:
        if len(self._baseline[rank]) < self.baseline_samples:
            self._baseline[rank].append(log_speed)
            self._log_speed[rank] = self._base(rank)
            return
        current = self._log_speed[rank]
        if current is None or abs(log_speed - current) > math.log(self.change_factor):
            if current is not None:
                self.changes += 1
                log.info("rank %d speed changed: %.3g x its estimate; now %.3g x its baseline", rank,
                         math.exp(log_speed - current), math.exp(log_speed - (self._base(rank) or log_speed)))
            self._log_speed[rank] = log_speed
        else:
            self._log_speed[rank] = (1 - self.alpha) * current + self.alpha * log_speed

    def scale(self, rank: int) -> float:
        base, current = self._base(rank), self._log_speed[rank]
        if base is None or current is None:
            return 1.0
        return min(max(math.exp(current - base), self.bounds[0]), self.bounds[1])

    def scales(self) -> tuple[float, ...] | None:
        """Per rank scale for `LinkEstimate.device_speed_scale`; None while every rank is at 1.0."""
        values = tuple(1.0 if abs(math.log(s)) < math.log(DEAD_BAND) else s
                       for s in (self.scale(r) for r in range(self.world_size)))
        return None if all(v == 1.0 for v in values) else values

    def __str__(self) -> str:
        return "compute speeds " + ", ".join(f"r{r}={self.scale(r):.2f}" for r in range(self.world_size))


__all__ = ["ComputeSpeedEstimator"]
