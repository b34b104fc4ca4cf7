"""Online re-estimation of the link from the exchanges the engine actually makes.

Each observed exchange is one equation of the cost model's link terms (edgeprism.plan.cost):

    seconds = latency_s · hops + 8 · max(0, nbytes - burst_bytes) / bandwidth_bps

(a ring all-gather over k ranks: hops = k - 1 and nbytes = (k - 1) · the largest message; a send:
hops = 1). The estimator keeps a short window of such observations, weights them by age (each request
halves the weight of everything before it) and by 1 / seconds² (so small and large messages count
alike), and solves for (latency_s, 1 / bandwidth_bps) by least squares with both non-negative. A weak
prior pulls towards the previous estimate, so a window that cannot separate the two (all messages of
one size) moves only the one it can see.

A link change is a step, not a drift: when a request's observations are off the current estimate by
more than `change_factor` in either direction (median ratio, and by more than `change_floor_s`), the
window is cleared and refilled from the new observations alone, so the planner follows within a
request or two instead of averaging the old link in for many requests.

`burst_bytes` (a token-bucket link's depth, from the profile) is fixed: the bytes a message sends at
line rate after the compute gap before it, which would otherwise read as a faster link.

Seeded from the profile's link measurement. Pure bookkeeping: no clock, no I/O (STYLE 9 spirit); the
engine feeds it measured seconds.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass

from edgeprism.plan.types import LinkEstimate

log = logging.getLogger(__name__)

MAX_BANDWIDTH_BPS = 1e12
"""Ceiling for the estimate (1 Tbit/s): beyond it, transfers are free as far as the planner cares."""
PRIOR_BANDWIDTH_BPS = 1e9
"""The prior on 1 / bandwidth is relative to the current estimate, or to this rate if the estimate is faster."""
SEPARABLE_SPREAD = 1.5
"""A window separates latency from bandwidth when its rate-bound bytes per hop span at least this ratio."""


@dataclass(frozen=True)
class LinkObservation:
    """One measured exchange: `seconds` of link time (emulated delay + collective) for `nbytes` bytes on
    the critical path over `hops` sequential message steps."""

    nbytes: float
    hops: float
    seconds: float

    def __post_init__(self) -> None:
        if not (self.nbytes >= 0 and self.hops >= 0 and math.isfinite(self.seconds) and self.seconds >= 0):
            raise ValueError(f"bad link observation {self}")


class OnlineLinkEstimator:
    """Live (bandwidth_bps, latency_s) of the group's link, refitted after every distributed request."""

    def __init__(self, bandwidth_bps: float, latency_s: float, window: int = 64, decay: float = 0.5,
                 change_factor: float = 2.0, change_floor_s: float = 1e-3, prior_weight: float = 1e-3,
                 min_seconds: float = 1e-4, burst_bytes: float = 0.0) -> None:
        if not (bandwidth_bps > 0 and latency_s >= 0):
            raise ValueError(f"seed link must have bandwidth_bps > 0 and latency_s >= 0, got "
                             f"{bandwidth_bps}, {latency_s}")
        if not (0 < decay <= 1 and change_factor > 1 and window >= 1):
            raise ValueError(f"need 0 < decay <= 1, change_factor > 1, window >= 1; got {decay}, {change_factor}, "
                             f"{window}")
        self.bandwidth_bps = float(min(bandwidth_bps, MAX_BANDWIDTH_BPS))
        self.latency_s = float(latency_s)
        self.decay = decay
        self.change_factor = change_factor
        self.change_floor_s = change_floor_s
        self.prior_weight = prior_weight
        self.min_seconds = min_seconds
        if burst_bytes < 0:
            raise ValueError(f"burst_bytes must be >= 0, got {burst_bytes}")
        self.burst_bytes = float(burst_bytes)
        self.updates = 0
        self.changes = 0
        # (request number, observation); the request number gives the age weight
        self._window: deque[tuple[int, LinkObservation]] = deque(maxlen=window)

    @classmethod
    def from_profile(cls, profile, **kwargs) -> OnlineLinkEstimator:
        kwargs.setdefault("burst_bytes", profile.link.burst_bytes)
        return cls(profile.link.bandwidth_bps, profile.link.latency_s, **kwargs)

    def estimate(self, healthy_ranks: tuple[int, ...] | None = None) -> LinkEstimate:
        return LinkEstimate(self.bandwidth_bps, self.latency_s, healthy_ranks)

    def predict_s(self, observation: LinkObservation) -> float:
        return self.latency_s * observation.hops + 8.0 * self._waited_bytes(observation) / self.bandwidth_bps

    def _waited_bytes(self, observation: LinkObservation) -> float:
        return max(0.0, observation.nbytes - self.burst_bytes)

    def update(self, observations: list[LinkObservation]) -> LinkEstimate:
        """Fold one request's observations in; return the new estimate."""
        observations = [o for o in observations if o.hops > 0 or o.nbytes > 0]
        if not observations:
            return self.estimate()
        self.updates += 1
        if self._changed(observations):
            self.changes += 1
            log.info("link changed: request's exchanges took %.3g x the estimate (%s); refitting from them alone",
                     self._median_ratio(observations), self)
            self._window.clear()
        for observation in observations:
            self._window.append((self.updates, observation))
        self._fit()
        return self.estimate()

    def _median_ratio(self, observations: list[LinkObservation]) -> float:
        return statistics.median(max(o.seconds, self.min_seconds) / max(self.predict_s(o), self.min_seconds)
                                 for o in observations)

    def _changed(self, observations: list[LinkObservation]) -> bool:
        if not self._window:
            return False
        ratio = self._median_ratio(observations)
        gap_s = abs(statistics.median(o.seconds - self.predict_s(o) for o in observations))
        return (ratio > self.change_factor or ratio < 1.0 / self.change_factor) and gap_s > self.change_floor_s

    def _fit(self) -> None:
        """Weighted least squares in (latency_s, g = 1 / bandwidth_bps), both >= 0, with a weak prior —
        when the window can tell the two apart. It cannot when every observation has about the same
        rate-bound bytes per hop (one message size: each request's layers are alike): such a window
        fixes only the time at that size, and the fit would put all of a change into whichever term
        is cheaper in the prior's units (a latency of 600 ms with an infinitely fast link, seen after a
        sag to a 15 Mbit/s link). Then both terms are scaled by the one factor the window does show
        (observed / predicted); with no rate-bound bytes at all, only the latency is refitted. A fit
        that finds larger messages no slower (g < 0) goes to the ceiling (the non-negative solution); the
        prior's unit for g is capped (`PRIOR_BANDWIDTH_BPS`) so that later data can move it back."""
        import numpy as np

        rows, targets = [], []
        per_hop = []
        for number, o in self._window:
            weight = self.decay ** (self.updates - number) / max(o.seconds, self.min_seconds)
            waited = self._waited_bytes(o)
            rows.append([weight * o.hops, weight * 8.0 * waited])
            targets.append(weight * o.seconds)
            per_hop.append(waited / max(o.hops, 1.0))
        a, b = np.asarray(rows), np.asarray(targets)
        g = 1.0 / self.bandwidth_bps
        if max(per_hop) <= 0.0:  # nothing waited on the rate: the latency is all the window shows
            self.latency_s = self._latency_alone(a, b, g)
            return
        if max(per_hop) < SEPARABLE_SPREAD * min(per_hop):
            factor = float(b.sum() / (a @ np.array([self.latency_s, g])).sum())
            self.latency_s *= factor
            self.bandwidth_bps = float(min(self.bandwidth_bps / factor, MAX_BANDWIDTH_BPS))
            return
        scale_latency = max(self.latency_s, self.min_seconds)
        # The prior's unit for g: the current g, but never below 1/PRIOR_BANDWIDTH_BPS — relative to an
        # estimate near the 1 Tbit/s ceiling the prior would pin g there whatever the data say.
        scale_g = max(g, 1.0 / PRIOR_BANDWIDTH_BPS)
        # prior rows: (latency - latency_0) / scale and (g - g_0) / scale, weighted prior_weight
        a = np.vstack([a, [[self.prior_weight / scale_latency, 0.0], [0.0, self.prior_weight / scale_g]]])
        b = np.concatenate([b, [self.prior_weight * self.latency_s / scale_latency, self.prior_weight * g / scale_g]])
        col_scale = np.array([1.0 / scale_latency, 1.0 / scale_g])  # solve in units of the current estimate
        solution, *_ = np.linalg.lstsq(a / col_scale, b, rcond=None)
        latency_s, new_g = solution / col_scale
        if latency_s < 0:  # clamp and refit the other alone
            latency_s = 0.0
            new_g = float(np.linalg.lstsq(a[:, 1:] / col_scale[1], b, rcond=None)[0][0] / col_scale[1])
        if new_g <= 0:  # larger messages no slower: transfers are free as far as the window shows
            new_g = 1.0 / MAX_BANDWIDTH_BPS
            latency_s = self._latency_alone(a, b, new_g)
        self.latency_s = float(latency_s)
        self.bandwidth_bps = float(1.0 / max(new_g, 1.0 / MAX_BANDWIDTH_BPS))

    @staticmethod
    def _latency_alone(a, b, g: float) -> float:
        """Least squares of the latency with g held, >= 0."""
        import numpy as np

        residual = b - a[:, 1] * g
        return max(0.0, float(np.linalg.lstsq(a[:, :1], residual, rcond=None)[0][0]))

    def __str__(self) -> str:
        return (f"link estimate {self.bandwidth_bps / 1e6:.4g} Mbit/s, {self.latency_s * 1e3:.3g} ms "
                f"({self.updates} updates, {len(self._window)} observations)")


__all__ = ["MAX_BANDWIDTH_BPS", "LinkObservation", "OnlineLinkEstimator"]


class ComputeBiasEstimator:
    """How far measured compute is from the profile's prediction, for local and for distributed plans
    (EWMA of log(measured / predicted)); their ratio is `LinkEstimate.local_compute_scale`.

    Load that changed since profiling (other processes on a board, thermal throttling) slows one device
    running alone and a pinned group differently; without this the planner keeps choosing by stale
    numbers. Needs both kinds of observations before it moves off 1.0 (static baselines, probes or
    earlier plans provide them)."""

    def __init__(self, alpha: float = 0.3, bounds: tuple[float, float] = (0.2, 5.0)) -> None:
        self.alpha = alpha
        self.bounds = bounds
        self.log_bias: dict[str, float] = {}

    def update(self, mode: str, measured_s: float, predicted_s: float) -> None:
        if measured_s <= 0 or predicted_s <= 0:
            return
        value = math.log(measured_s / predicted_s)
        old = self.log_bias.get(mode)
        self.log_bias[mode] = value if old is None else (1 - self.alpha) * old + self.alpha * value

    @property
    def local_compute_scale(self) -> float:
        if "local" not in self.log_bias or "distributed" not in self.log_bias:
            return 1.0
        scale = math.exp(self.log_bias["local"] - self.log_bias["distributed"])
        return min(max(scale, self.bounds[0]), self.bounds[1])
