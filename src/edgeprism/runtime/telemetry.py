"""Per-request numbers the plan's ranks share after a distributed request (untimed), and link probes."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from edgeprism.runtime.link_estimate import LinkObservation

TELEMETRY_HEAD = 6
"""Values before the per-layer triples on the wire: the six scalar fields of `RankTelemetry`."""


class LayerExchange(NamedTuple):
    """One rank's side of one layer exchange."""

    nbytes: float
    delay_s: float
    """Emulated one-way delay (and loopback rate sleep) charged to the exchange."""
    wait_s: float
    """Seconds the rank waited in the collective."""


@dataclass(frozen=True)
class RankTelemetry:
    """What one plan rank reports after a distributed request (all-gathered as float64 values)."""

    wall_s: float
    nbytes_sent: float
    layer_nbytes: float
    staging_s: float
    collective_s: float
    emulated_delay_s: float
    layers: tuple[LayerExchange, ...] = ()

    @classmethod
    def of(cls, stats, wall_s: float, num_layers: int = 0) -> RankTelemetry:
        """This rank's numbers from its exchanger's stats (the first `num_layers` layer exchanges)."""
        layers = [LayerExchange(float(sent), delay_s, wait_s)
                  for kind, sent, delay_s, wait_s in stats.events if kind == "layer"][:num_layers]
        layers += [LayerExchange(0.0, 0.0, 0.0)] * (num_layers - len(layers))
        return cls(wall_s, float(stats.nbytes_sent), float(stats.per_kind_nbytes.get("layer", 0)), stats.staging_s,
                   stats.collective_s, stats.emulated_delay_s, tuple(layers))

    def to_values(self) -> list[float]:
        return [self.wall_s, self.nbytes_sent, self.layer_nbytes, self.staging_s, self.collective_s,
                self.emulated_delay_s] + [x for layer in self.layers for x in layer]

    @classmethod
    def from_values(cls, values: Sequence[float]) -> RankTelemetry:
        head, rest = values[:TELEMETRY_HEAD], values[TELEMETRY_HEAD:]
        layers = tuple(LayerExchange(*rest[i:i + 3]) for i in range(0, len(rest) - 2, 3))
        return cls(*head, layers=layers)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe_exchanges(exchanger, nbytes: int) -> None:
    world = exchanger.ctx.world_size
    for size, kind in ((8, "probe-sync"), (8, "probe"), (nbytes, "probe")):
        exchanger.all_gather_bytes(torch.zeros(size, dtype=torch.uint8), [size] * world, kind=kind)


def telemetry(exchanger, stats, wall_s: float, num_layers: int) -> list[RankTelemetry]:
    """All-gather each plan rank's numbers for the request just served (after it, so untimed)."""
    mine = torch.tensor(RankTelemetry.of(stats, wall_s, num_layers).to_values(), dtype=torch.float64)
    payload = mine.view(torch.uint8)
    world = exchanger.ctx.world_size
    gathered = exchanger.all_gather_bytes(payload, [payload.numel()] * world, kind="telemetry")
    return [RankTelemetry.from_values(g.clone().view(torch.float64).tolist()) for g in gathered]


BALANCED = 0.1
"""A layer exchange informs the link estimate when the rank that finished it soonest waited at least
this fraction of the wait of the rank that took longest (see `observations`)..."""
SKEW_FLOOR_S = 1e-3
"""...or when no rank waited longer than this (the skew is then at most this too)."""


def observations(per_rank: Sequence[RankTelemetry], k: int, num_layers: int) -> list[LinkObservation]:
    """Link observations of one request: per message size, the median over its informative layer
    exchanges of (least + greatest) / 2 of the ranks' times (emulated delay + wait).

    Why: a rank that reaches an all-gather s seconds before its peer takes s + t (t: delay + transfer),
    the later one max(delay, t - s), its peer's bytes being there already. When the later one waited
    at all, the two times sum to exactly 2t whatever the skew; when it did not (s >= transfer), the
    layer says only that the transfer is below s and is left out (the times then measure the other
    rank's compute, not the link: the soonest alone reads as a link with no transfer time, the mean
    as a slower link than it is). So a layer counts when the soonest rank's wait is at least
    `BALANCED` x the longest one's (skew below ~0.8 x the transfer), or when the two times differ by
    at most `BALANCED` x the longer (their difference is twice the skew), or when no wait exceeds
    `SKEW_FLOOR_S`. Delays are compared in the times, not the waits: the loopback fallback's rate is a
    sleep before sending, counted with the delay. For k > 2 ranks (a ring) the same pairing is an
    approximation. Rank 0's sends (the scatter) are never observations: a send returns once the
    kernel's socket buffer holds the bytes, long before they arrive."""
    by_size: dict[float, list[float]] = {}
    for i in range(num_layers):
        sent = max(r.layers[i].nbytes for r in per_rank)
        if sent <= 0:
            continue
        exchanges = [r.layers[i] for r in per_rank]
        times = [(x.delay_s + x.wait_s, x.wait_s) for x in exchanges]  # (delay + wait, wait)
        (soonest, soonest_wait), (longest, longest_wait) = min(times), max(times)
        if (longest_wait <= SKEW_FLOOR_S or soonest_wait >= BALANCED * longest_wait
                or longest - soonest <= BALANCED * longest):
            by_size.setdefault(sent, []).append((soonest + longest) / 2)
    return [LinkObservation((k - 1) * sent, k - 1, statistics.median(t)) for sent, t in by_size.items()]


__all__ = ["TELEMETRY_HEAD", "LayerExchange", "RankTelemetry", "observations", "probe_exchanges", "sync", "telemetry"]
