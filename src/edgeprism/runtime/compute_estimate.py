"""Online per-device compute speed: noticing a straggler from the ranks' own timings, and taking it back.

After every distributed request each plan rank reports its wall, staging, collective and emulated-delay
seconds and how much of the link time ran beside compute (`telemetry.RankTelemetry`); its wall less staging
and the link time it waited for is the rank's compute (`RankTelemetry.compute_s`: under overlap and micro-batches
the exchanges run on a background thread, and taking their whole time off read a link-bound rank's compute near
zero, its speed as anything). The cost model says what that compute would take at speed 1.0 for the rank's
tokens (`plan.cost.rank_compute_s`), so

    observed speed_p = predicted_p(speed 1) / measured compute_p.

**Relative to rank 0, in the same request.** A busy host (other jobs on the machine, a thermal throttle of
the whole board) slows every rank of a request alike; judged against the profile alone, that read as
"this device is slow" and sent plans local (issue 17: on this project's shared 2-core VM every device's
absolute speed wandered by ±30 % and more with the load). So each rank is judged by its speed *over rank
0's speed in the same request* (rank 0 is in every plan): host-wide load cancels, and what is left is
what the planner needs — how the devices compare (how fast rank 0 itself runs alone is the local bias's
business, `LinkEstimate.local_compute_scale`). A device is compared with *itself*: its baseline is the
median of its first `baseline_samples` relative observations (the profile's speeds may be off for a
device, which the baseline absorbs), and its scale is the current relative speed over that baseline:
1.0 while it runs as it did, 0.25 once it runs at a quarter (rank 0's scale is 1.0 by definition).

**A change needs `confirm` requests in a row.** An observation off the current estimate by more than
`change_factor` is held back; only when `confirm` consecutive requests all say so (the same way) does
the estimate jump to their median (a straggler is a step, the planner reacts on the next request). A
lone outlier (one rank descheduled for a moment) moves nothing; smaller changes are averaged in (EWMA in
log). A device the planner left out gives no more observations, so after `retry_after` requests without
one its scale is moved halfway (in log) back to its baseline: the planner tries it again with a moderate
share, and that one probe observation is taken at once — restored (taken back) or slow again (left out
again, having cost a moderate share, not a full one).

**Decoders.** After a decoder's prefill the plan's last rank decodes the new tokens alone from its cache
(`PositionWise.generate`), and rank 0 waits for them in a receive: the last rank's wall time then holds
compute the prediction (prefill only) does not. `update(..., exclude=)` leaves such a rank out of the
request (neither observed nor aged). Pure bookkeeping: no clock, no I/O; the engine feeds it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence

log = logging.getLogger(__name__)

MIN_COMPUTE_S = 1e-3
"""Compute times below this (a rank with a token or two) are too noisy to judge a device by."""
DEAD_BAND = 1.3
"""Scales within this factor of 1.0 are reported as 1.0: a shared host's noise should not move the shares
(on this project's busy 2-core VM every device's scale wandered by about ±30 % with the machine's load,
docs/TESTBED.md; a straggler at a quarter of its speed is far outside)."""


class ComputeSpeedEstimator:
    """Live speed scale per rank (rank order, `world_size` values; 1.0 = as the device first ran, relative to
    rank 0 in the same requests)."""

    def __init__(self, world_size: int, alpha: float = 0.5, change_factor: float = 1.6, baseline_samples: int = 2,
                 retry_after: int = 4, bounds: tuple[float, float] = (0.02, 4.0), confirm: int = 2) -> None:
        if world_size < 1 or not (0 < alpha <= 1) or change_factor <= 1 or baseline_samples < 1 or retry_after < 1 \
                or confirm < 1:
            raise ValueError(f"need world_size >= 1, 0 < alpha <= 1, change_factor > 1, baseline_samples >= 1, "
                             f"retry_after >= 1, confirm >= 1; got {world_size}, {alpha}, {change_factor}, "
                             f"{baseline_samples}, {retry_after}, {confirm}")
        self.world_size = world_size
        self.alpha = alpha
        self.change_factor = change_factor
        self.baseline_samples = baseline_samples
        self.retry_after = retry_after
        self.bounds = bounds
        self.confirm = confirm
        self._baseline: list[list[float]] = [[] for _ in range(world_size)]
        """Log relative speeds of each rank's first observations."""
        self._log_speed: list[float | None] = [None] * world_size
        self._pending: list[list[float]] = [[] for _ in range(world_size)]
        """Consecutive observations off the estimate by more than `change_factor`, not yet confirmed."""
        self._probing: list[bool] = [False] * world_size
        """A retry is under way: its first observation is taken at once."""
        self._unseen: list[int] = [0] * world_size
        """Requests since each rank was last observed."""
        self.changes = 0

    def _base(self, rank: int) -> float | None:
        samples = self._baseline[rank]
        if len(samples) < self.baseline_samples:
            return None
        return sorted(samples)[len(samples) // 2]

    def update(self, ranks: Sequence[int], predicted_s: Sequence[float], measured_s: Sequence[float],
               exclude: Collection[int] = ()) -> None:
        """One request: the plan's ranks (rank 0 first), their predicted compute at speed 1.0 and their measured
        compute. Ranks in `exclude` (a decoder's decoding rank) are left out of this request altogether; every
        other rank not observed goes one request longer unobserved. Without a usable rank 0 observation the
        request says nothing about any rank (nothing to compare with)."""
        log_speeds = {rank: math.log(predicted / measured)
                      for rank, predicted, measured in zip(ranks, predicted_s, measured_s)
                      if rank not in exclude and measured >= MIN_COMPUTE_S and predicted > 0
                      and math.isfinite(measured)}
        reference = log_speeds.get(0)
        observed = set(ranks) if reference is None and ranks else set(log_speeds)
        if reference is not None:
            for rank, log_speed in log_speeds.items():
                if rank != 0:
                    self._observe(rank, log_speed - reference)
        for rank in range(self.world_size):
            if rank in observed or rank in exclude or rank == 0:
                self._unseen[rank] = 0
                continue
            self._unseen[rank] += 1
            if self._unseen[rank] >= self.retry_after and self.scale(rank) != 1.0:
                log.info("rank %d unobserved for %d requests at scale %.3g: trying it again halfway to its "
                         "baseline", rank, self._unseen[rank], self.scale(rank))
                base, current = self._base(rank), self._log_speed[rank]
                self._log_speed[rank] = base if base is None or current is None else (base + current) / 2
                self._unseen[rank] = 0
                self._pending[rank] = []
                self._probing[rank] = True

    def _observe(self, rank: int, log_speed: float) -> None:
        if len(self._baseline[rank]) < self.baseline_samples:
            self._baseline[rank].append(log_speed)
            self._log_speed[rank] = self._base(rank)
            return
        current = self._log_speed[rank]
        off = None if current is None else log_speed - current
        probing, self._probing[rank] = self._probing[rank], False
        if current is None or off is None or abs(off) <= math.log(self.change_factor):
            self._pending[rank] = []
            self._log_speed[rank] = (log_speed if current is None
                                     else (1 - self.alpha) * current + self.alpha * log_speed)
            return
        pending = self._pending[rank]
        if pending and (pending[-1] - current) * off < 0:
            pending.clear()  # the other way from the held-back ones: not the same change
        pending.append(log_speed)
        if len(pending) < self.confirm and not probing:
            return
        new = sorted(pending)[len(pending) // 2]
        self.changes += 1
        log.info("rank %d speed changed (%d request(s) in a row): %.3g x its estimate; now %.3g x its baseline",
                 rank, len(pending), math.exp(new - current), math.exp(new - (self._base(rank) or new)))
        self._log_speed[rank] = new
        self._pending[rank] = []

    def scale(self, rank: int) -> float:
        base, current = self._base(rank), self._log_speed[rank]
        if rank == 0 or base is None or current is None:
            return 1.0
        return min(max(math.exp(current - base), self.bounds[0]), self.bounds[1])

    def scales(self) -> tuple[float, ...] | None:
        """Per rank scale for `LinkEstimate.device_speed_scale`; None while every rank is at 1.0."""
        values = tuple(1.0 if abs(math.log(s)) < math.log(DEAD_BAND) else s
                       for s in (self.scale(r) for r in range(self.world_size)))
        return None if all(v == 1.0 for v in values) else values

    def __str__(self) -> str:
        return "compute speeds (relative to rank 0) " + ", ".join(
            f"r{r}={self.scale(r):.2f}" for r in range(self.world_size))


__all__ = ["ComputeSpeedEstimator"]
