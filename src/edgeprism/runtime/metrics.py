"""What the engine reports per request: a frozen metrics row (units in the names) and the result."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class MetricsRow:
    """One served request. Seconds are wall-clock on rank 0 unless named per rank; bytes are what the
    plan's ranks put on the wire for the request (layer exchanges, scatter, gather and headers)."""

    request_id: str
    plan: dict[str, Any]
    """The Plan as a dict (mode, ranks, token_counts, codec, cr, predictions, reason, profile_hash)."""
    mode: str
    batch: int
    num_tokens: int
    predicted_latency_s: float
    latency_s: float
    predicted_energy_j: float
    energy_j: float
    energy_source: str
    """"metered" (a power meter's window) or "modelled" (measured phase times × the profile's power model)."""
    bytes_exchanged: int
    """Bytes all ranks of the plan sent for this request (0 for a local plan)."""
    layer_nbytes: int
    """The part of `bytes_exchanged` sent in per-layer exchanges."""
    staging_s: float
    collective_s: float
    """Rank 0's time inside collectives, including emulated link delay."""
    compute_s: float
    """latency_s - staging_s - collective_s on rank 0 (model math, codec work, Python). With the exchange
    overlapped (encoders, partition/overlap.py) part of collective_s ran beside compute, so this is a lower
    bound; `timeline` splits each layer exactly."""
    emulated_delay_s: float
    link_bandwidth_bps: float
    """The live link estimate the plan was chosen with."""
    link_latency_s: float
    blew_prediction: bool
    """latency_s exceeded the prediction by more than the engine's `blow_factor`."""
    fidelity_loss: float | None = 0.0
    """The answering plan's measured fidelity loss for this model (issue 16): 0 for local plans and lossless
    codecs, None when the codec's loss was never measured (used by explicit opt-in only)."""
    timeline: list[dict[str, float]] = field(default_factory=list)
    """Rank 0's layers of a distributed request: {layer, encode_s, exchange_s, wait_s, compute_s} each
    (partition/timeline.py; exchange_s may overlap compute, wait_s is what it did not hide); [] when local."""
    cpu_s: float | None = None
    """Rank 0's process CPU seconds over the request (`time.process_time`: the compute thread, the exchange's
    background thread, kernel networking charged to them). Beside latency_s it tells a rank that computed from
    one that waited; on a device with a CPU quota, CPU seconds over the quota are wall seconds. None: not
    measured (a row from before this field)."""
    fallback: str = ""
    """Why a distributed plan was rerun on rank 0 (a peer died, hung or was cut off); "" when it was not.
    latency_s then includes the failed attempt; `plan` and `mode` say what answered (local)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __str__(self) -> str:
        how = self.mode if self.mode == "local" else f"{self.plan.get('codec')} over ranks {self.plan.get('ranks')}"
        loss = self.fidelity_loss
        how += " (fidelity loss unmeasured)" if loss is None else f" (fidelity loss {loss:.2%})"
        if self.fallback:
            how += f" (fallback: {self.fallback})"
        return (f"request {self.request_id}: {how}; {self.latency_s * 1e3:.1f} ms (predicted "
                f"{self.predicted_latency_s * 1e3:.1f}), {self.energy_j:.3g} J {self.energy_source}, "
                f"{self.bytes_exchanged:,} B; staging {self.staging_s * 1e3:.1f} ms, collective "
                f"{self.collective_s * 1e3:.1f} ms, compute {self.compute_s * 1e3:.1f} ms")


@dataclass(frozen=True)
class Result:
    """Outputs of one request on rank 0 (each (B, ...), on the engine's device) and its metrics row."""

    request_id: str
    outputs: dict[str, Tensor]
    metrics: MetricsRow


__all__ = ["MetricsRow", "Result"]
