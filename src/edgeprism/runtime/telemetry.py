"""Per-request numbers the plan's ranks share after a distributed request (untimed), and link probes."""

from __future__ import annotations

import statistics

import torch

from edgeprism.runtime.link_estimate import LinkObservation

TELEMETRY_HEAD = 6  # wall_s, nbytes_sent, layer_nbytes, staging_s, collective_s, emulated_delay_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe_exchanges(exchanger, nbytes: int) -> None:
    world = exchanger.ctx.world_size
    for size, kind in ((8, "probe-sync"), (8, "probe"), (nbytes, "probe")):
        exchanger.all_gather_bytes(torch.zeros(size, dtype=torch.uint8), [size] * world, kind=kind)


def telemetry(exchanger, stats, wall_s: float, num_layers: int) -> list[list[float]]:
    """All-gather each plan rank's numbers for the request just served (after it, so untimed):
    [wall_s, nbytes_sent, layer_nbytes, staging_s, collective_s, delay_s,
     (layer bytes, layer emulated delay s, layer collective wait s) x L]."""
    layer = [(sent, delay_s, wait_s) for kind, sent, delay_s, wait_s in stats.events if kind == "layer"][:num_layers]
    layer += [(0, 0.0, 0.0)] * (num_layers - len(layer))
    values = [wall_s, float(stats.nbytes_sent), float(stats.per_kind_nbytes.get("layer", 0)), stats.staging_s,
              stats.collective_s, stats.emulated_delay_s] + [x for triple in layer for x in triple]
    mine = torch.tensor(values, dtype=torch.float64)
    payload = mine.view(torch.uint8)
    world = exchanger.ctx.world_size
    gathered = exchanger.all_gather_bytes(payload, [payload.numel()] * world, kind="telemetry")
    return [g.clone().view(torch.float64).tolist() for g in gathered]


BALANCED = 0.1
"""A layer exchange informs the link estimate when the rank that finished it soonest waited at least
this fraction of the wait of the rank that took longest (see `observations`)..."""
SKEW_FLOOR_S = 1e-3
"""...or when no rank waited longer than this (the skew is then at most this too)."""


def observations(per_rank: list[list[float]], k: int, num_layers: int) -> list[LinkObservation]:
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
        at = TELEMETRY_HEAD + 3 * i
        sent = max(r[at] for r in per_rank)
        if sent <= 0:
            continue
        times = [(r[at + 1] + r[at + 2], r[at + 2]) for r in per_rank]  # (delay + wait, wait)
        (soonest, soonest_wait), (longest, longest_wait) = min(times), max(times)
        if (longest_wait <= SKEW_FLOOR_S or soonest_wait >= BALANCED * longest_wait
                or longest - soonest <= BALANCED * longest):
            by_size.setdefault(sent, []).append((soonest + longest) / 2)
    return [LinkObservation((k - 1) * sent, k - 1, statistics.median(t)) for sent, t in by_size.items()]


__all__ = ["sync", "probe_exchanges", "telemetry", "observations", "TELEMETRY_HEAD"]
