"""Per-request numbers the plan's ranks share after a distributed request (untimed), and link probes."""

from __future__ import annotations

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
    [wall_s, nbytes_sent, layer_nbytes, staging_s, collective_s, delay_s, (layer bytes, layer link s) x L]."""
    layer = [(sent, seconds) for kind, sent, seconds in stats.events if kind == "layer"][:num_layers]
    layer += [(0, 0.0)] * (num_layers - len(layer))
    values = [wall_s, float(stats.nbytes_sent), float(stats.per_kind_nbytes.get("layer", 0)), stats.staging_s,
              stats.collective_s, stats.emulated_delay_s] + [x for pair in layer for x in pair]
    mine = torch.tensor(values, dtype=torch.float64)
    payload = mine.view(torch.uint8)
    world = exchanger.ctx.world_size
    gathered = exchanger.all_gather_bytes(payload, [payload.numel()] * world, kind="telemetry")
    return [g.clone().view(torch.float64).tolist() for g in gathered]


def observations(per_rank: list[list[float]], stats, k: int, num_layers: int) -> list[LinkObservation]:
    """Link observations of one request: each layer exchange, timed by the rank that waited least for it
    (the last to arrive waits only for the wire, not for slower peers' compute), and rank 0's sends."""
    out = []
    for i in range(num_layers):
        sent = max(r[TELEMETRY_HEAD + 2 * i] for r in per_rank)
        seconds = min(r[TELEMETRY_HEAD + 2 * i + 1] for r in per_rank)
        if sent > 0:
            out.append(LinkObservation((k - 1) * sent, k - 1, seconds))
    out += [LinkObservation(sent, 1, seconds) for kind, sent, seconds in stats.events if kind == "scatter"]
    return out


__all__ = ["sync", "probe_exchanges", "telemetry", "observations", "TELEMETRY_HEAD"]
