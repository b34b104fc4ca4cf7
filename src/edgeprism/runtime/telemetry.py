"""Per-request numbers the plan's ranks share after a distributed request (untimed), and link probes."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from edgeprism.runtime.link_estimate import LinkObservation

TELEMETRY_HEAD = 7
"""Values before the per-layer triples on the wire: the seven scalar fields of `RankTelemetry`."""


class LayerExchange(NamedTuple):
    """One rank's side of one layer exchange."""

    nbytes: float
    delay_s: float
    """Emulated one-way delay (and loopback rate sleep) charged to the exchange."""
    wait_s: float
    """Seconds the collective took on this rank, from issuing it to its completion (on the exchanger's background
    thread for an overlapped exchange: the transfer as that thread saw it, not what the compute thread waited)."""


@dataclass(frozen=True)
class RankTelemetry:
    """What one plan rank reports after a distributed request (all-gathered as float64 values)."""

    wall_s: float
    nbytes_sent: float
    layer_nbytes: float
    staging_s: float
    collective_s: float
    emulated_delay_s: float
    hidden_s: float = 0.0
    """Of collective_s + emulated_delay_s: link seconds spent beside compute (overlapped exchanges), not waited for."""
    layers: tuple[LayerExchange, ...] = ()

    @classmethod
    def of(cls, stats, wall_s: float, num_layers: int = 0) -> RankTelemetry:
        """This rank's numbers from its exchanger's stats (the first `num_layers` layer exchanges; with micro-batches
        those of the first layers of every slice)."""
        layers = [LayerExchange(float(sent), delay_s, wait_s)
                  for kind, sent, delay_s, wait_s in stats.events if kind == "layer"][:num_layers]
        layers += [LayerExchange(0.0, 0.0, 0.0)] * (num_layers - len(layers))
        return cls(wall_s, float(stats.nbytes_sent), float(stats.per_kind_nbytes.get("layer", 0)), stats.staging_s,
                   stats.collective_s, stats.emulated_delay_s, stats.hidden_s, tuple(layers))

    @property
    def compute_s(self) -> float:
        """The rank's own work: its wall time less staging and the link seconds it waited for. An overlapped
        exchange's link time ran beside compute (`hidden_s`), so only its waited part is taken off: taking
        the whole collective time off (as before) read an overlapped, link-bound rank's compute near zero."""
        return self.wall_s - self.staging_s - (self.collective_s + self.emulated_delay_s - self.hidden_s)

    def to_values(self) -> list[float]:
        return [self.wall_s, self.nbytes_sent, self.layer_nbytes, self.staging_s, self.collective_s,
                self.emulated_delay_s, self.hidden_s] + [x for layer in self.layers for x in layer]

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


def observations(per_rank: Sequence[RankTelemetry], k: int, num_layers: int,
                 causal: bool = False) -> list[LinkObservation]:
    """Link observations of one request: per message size, the median over its layer exchanges of the least of
    the ranks' times (emulated delay + collective), on the ring's k - 1 hops and (k - 1) x the message.

    Why the least: GLOO sends by rendezvous — no byte of a message moves before its receiver has posted the
    receive (gloo's tcp pair: "sends cannot execute until the remote side is ready to receive"). So the rank
    that issues an all-gather last waits for the whole transfer, and every other rank for that plus its own
    lead: the least time is the transfer, however skewed the ranks arrived, at 2 ranks and around a ring of k
    (each hop waits for its receiver; the last rank's chunks still cross k - 1 hops after it arrives). The
    rule before (the mean of the least and the greatest time, for layers that looked balanced) assumed the
    late rank's peer bytes were already there, so that the two times summed to twice the transfer: under
    rendezvous they sum to twice the transfer plus the skew, and the estimate read the ranks' compute skew as
    a slower link — more of it with overlapped, micro-batched exchanges and with more ranks
    (`scripts/bench_link_skew.py`, 4 x 0.5 core over wifi4, 300 KB per rank: as the skew bound grew from 0 to
    0.3 s the rule before read 173 -> 249 ms, the least time 163 -> 164 ms; docs/TESTBED.md). Delays are in the
    times, not only the waits: the loopback fallback's rate is a sleep before sending, counted with the delay.
    The times are the collective's own (issue to completion), also for an exchange in the background beside
    compute. Rank 0's sends (the scatter) are never observations: a send returns once the kernel's socket buffer
    holds the bytes, long before they arrive.

    `causal` (decoders: rank p sends its message forward to the k - 1 - p ranks after it): for the same reason only
    the last rank is timed — it receives the other k - 1 messages, the forward exchange the cost model prices (one
    hop, (k - 1) x the largest message); a send-only rank 0 would read as a link with no transfer time."""
    by_size: dict[float, list[float]] = {}
    timed = per_rank[-1:] if causal else per_rank
    for i in range(num_layers):
        if causal:  # a rank's recorded bytes are its message times its receivers
            sent = max(r.layers[i].nbytes / (k - 1 - p) for p, r in enumerate(per_rank[:-1]))
        else:
            sent = max(r.layers[i].nbytes for r in per_rank)
        if sent <= 0:
            continue
        least_s = min(r.layers[i].delay_s + r.layers[i].wait_s for r in timed)
        if least_s > 0:  # 0: a rank recorded fewer layer exchanges (its padding), which says nothing
            by_size.setdefault(sent, []).append(least_s)
    hops = 1 if causal else k - 1
    return [LinkObservation((k - 1) * sent, hops, statistics.median(t)) for sent, t in by_size.items()]


__all__ = ["TELEMETRY_HEAD", "LayerExchange", "RankTelemetry", "observations", "probe_exchanges", "sync", "telemetry"]
