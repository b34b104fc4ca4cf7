"""The planner's inputs and outputs: plain frozen values, printable and JSON round-trippable."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from edgeprism.partition.ranges import TokenRange, ranges_of
from edgeprism.profile.jsondata import from_json_dict, to_json_dict

Objective = Literal["latency", "energy", "edp"]
OBJECTIVES: tuple[str, ...] = ("latency", "energy", "edp")
Mode = Literal["local", "distributed"]


@dataclass(frozen=True)
class Request:
    """One inference request as the planner sees it: which model, how many rows and tokens per row."""

    model_name: str
    batch: int
    num_tokens: int
    input_bytes_per_token: float | None = None
    """Bytes per token and row rank 0's scatter sends for this request (8-bit pixels travel as levels, about a
    quarter of float32: partition/scatter.py); None: the profile's `input_bytes_per_token`."""

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError(f"request batch must be >= 1, got {self.batch}")
        if self.num_tokens < 1:
            raise ValueError(f"request num_tokens must be >= 1, got {self.num_tokens}")
        if self.input_bytes_per_token is not None and not self.input_bytes_per_token >= 0:
            raise ValueError(f"request input_bytes_per_token must be >= 0, got {self.input_bytes_per_token}")


@dataclass(frozen=True)
class LinkEstimate:
    """The live state of the group: link bandwidth (bits/s), one-way per-message latency, and which
    ranks are healthy (None = all). Rank 0, the coordinator, is always taken as healthy."""

    bandwidth_bps: float
    latency_s: float
    healthy_ranks: tuple[int, ...] | None = None
    local_compute_scale: float = 1.0
    """How much slower (> 1) or faster (< 1) local compute runs than the profile predicts, relative to
    distributed compute — estimated online from measured requests (1.0: trust the profile). Load that
    changed since profiling hits one device and a pinned group differently."""
    sealed: bool = False
    """The data lanes seal every message (edgeprism.comm.sealing): the cost model charges the profile's
    measured sealing cost (none when the profile has no `sealing`)."""
    device_speed_scale: tuple[float, ...] | None = None
    """Per rank (rank order): measured speed / the profile's speed, estimated online from each rank's
    compute time (`runtime.compute_estimate`): 0.25 = that device now runs at a quarter of its profiled
    speed (a straggler). None: trust the profile's speeds."""
    overlap: bool = False
    """The runtime overlaps each layer's exchange with its own-key attention (`EngineConfig.overlap`): the cost
    model credits what that hides (plan/pipeline.py). False: the sequential model."""
    micro_batches: int = 1
    """The runtime runs a batch as this many micro-batches (`EngineConfig.micro_batches`; plan/pipeline.py)."""
    micro_batch_choices: tuple[int, ...] = ()
    """The counts the runtime may run, the planner choosing per request (plan/micro.py); empty: `micro_batches`."""

    def effective_speeds(self, profile_speeds: tuple[float, ...]) -> tuple[float, ...]:
        """The profile's device speeds times the live scale (the profile's alone when there is none)."""
        scale = self.device_speed_scale
        if scale is None:
            return profile_speeds
        if len(scale) != len(profile_speeds):
            raise ValueError(f"device_speed_scale has {len(scale)} values for {len(profile_speeds)} devices")
        return tuple(s * f for s, f in zip(profile_speeds, scale))

    def __post_init__(self) -> None:
        if self.device_speed_scale is not None and not all(
                math.isfinite(f) and f > 0 for f in self.device_speed_scale):
            raise ValueError(f"device_speed_scale must be finite and > 0, got {self.device_speed_scale}")
        if self.micro_batches < 1 or any(m < 1 for m in self.micro_batch_choices):
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches} {list(self.micro_batch_choices)}")
        if not (math.isfinite(self.local_compute_scale) and self.local_compute_scale > 0):
            raise ValueError(f"local_compute_scale must be > 0, got {self.local_compute_scale}")
        if not (math.isfinite(self.bandwidth_bps) and self.bandwidth_bps > 0):
            raise ValueError(f"link bandwidth_bps must be > 0, got {self.bandwidth_bps}")
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError(f"link latency_s must be >= 0, got {self.latency_s}")


DEFAULT_MAX_FIDELITY_LOSS = 0.01
"""The default fidelity budget: a codec may lose at most 1 % of the model's metric (top-1 agreement >= 0.99;
a decoder's next-token agreement >= 0.99, never its perplexity), as measured for this model (issue 16:
faithful by default)."""


@dataclass(frozen=True)
class Limits:
    """Constraints on the choice.

    `max_fidelity_loss` is the largest normalised metric loss in [0, 1] a codec may have, as measured
    (`CodecFidelity.fidelity_loss`; default 1 %; None: any measured loss). A codec whose loss for this model
    was never measured is used only when `allow_unmeasured_codecs` is set: an explicit opt-in, never a
    default. `max_latency_s` is a latency ceiling (None: none)."""

    max_fidelity_loss: float | None = DEFAULT_MAX_FIDELITY_LOSS
    max_latency_s: float | None = None
    allow_unmeasured_codecs: bool = False
    codecs: tuple[str, ...] | None = None
    """Only these of the profile's codecs (None: any); the fidelity rules above still apply to them."""

    def __post_init__(self) -> None:
        if self.codecs is not None:
            object.__setattr__(self, "codecs", tuple(self.codecs))  # frozen: a list from JSON becomes a tuple
        if self.max_fidelity_loss is not None and not (0.0 <= self.max_fidelity_loss <= 1.0):
            raise ValueError(f"max_fidelity_loss must be in [0, 1] (0.01 = 1 %), got {self.max_fidelity_loss}")
        if self.max_latency_s is not None and not (self.max_latency_s > 0):
            raise ValueError(f"max_latency_s must be > 0, got {self.max_latency_s}")

    def allows(self, codec: str, fidelity_loss: float | None) -> bool:
        """Whether the profile's `codec` of this fidelity loss may be used (listed, and `admits` its loss)."""
        return (self.codecs is None or codec in self.codecs) and self.admits(fidelity_loss)

    def admits(self, fidelity_loss: float | None) -> bool:
        """Whether a codec of this (measured, or None: unmeasured) fidelity loss may be used."""
        if fidelity_loss is None:
            return self.allow_unmeasured_codecs
        return self.max_fidelity_loss is None or fidelity_loss <= self.max_fidelity_loss


@dataclass(frozen=True)
class Prediction:
    """What the cost model expects for one candidate, term by term (seconds are on the critical path).

    total_s = compute_s + staging_s + network_s + latency_s, where latency_s is the per-message
    latency times messages on the critical path and network_s the bytes over the bandwidth."""

    compute_s: float
    staging_s: float
    network_s: float
    latency_s: float
    energy_j: float
    energy_source: str
    exchanges: int
    """Collective rounds per request (one all-gather per layer, plus scatter and gather)."""
    wire_bytes: float
    """Bytes the busiest rank receives over the link per request."""

    @property
    def total_s(self) -> float:
        return self.compute_s + self.staging_s + self.network_s + self.latency_s

    def explain(self) -> str:
        return (f"{self.total_s * 1e3:.1f} ms = compute {self.compute_s * 1e3:.1f} + staging {self.staging_s * 1e3:.1f}"
                f" + network {self.network_s * 1e3:.1f} ({self.wire_bytes / 1e3:.1f} kB) + latency "
                f"{self.latency_s * 1e3:.1f} ({self.exchanges} exchanges); {self.energy_j:.2f} J {self.energy_source}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_s": self.total_s}


@dataclass(frozen=True)
class Plan:
    """How one request runs: on rank 0 alone, or split by position over `ranks` with `token_counts`
    tokens each (shares proportional to measured speed), exchanging through `codec`."""

    mode: Mode
    ranks: tuple[int, ...]
    token_shares: tuple[float, ...]
    """Fraction of the tokens per rank in `ranks` (sums to 1)."""
    token_counts: tuple[int, ...]
    """Tokens per rank for this request's num_tokens (contiguous, in rank order, each >= 1): what the cost
    model costed (`partition.ranges.apportion`, the one splitter). Empty only in an excluded candidate that
    could not be split."""
    token_ranges: tuple[TokenRange, ...] = field(init=False)
    """The contiguous token range [start, end) each rank of the plan owns, in rank order: derived from
    `token_counts` (never given), carried in the JSON so the runtime splits the request exactly as costed.
    Plan JSON written before this field loads; JSON whose ranges differ from its counts is refused."""
    codec: str
    """Exchange codec name ("" for local)."""
    cr: int
    wire_dtype: str
    predicted_latency_s: float
    predicted_energy_j: float
    energy_source: str
    objective: Objective
    reason: str
    within_limits: bool = True
    """False when no candidate met the latency ceiling and the fastest was taken instead."""
    profile_hash: str = ""
    fidelity_loss: float | None = 0.0
    """The codec's measured fidelity loss for this model (`CodecFidelity.fidelity_loss`): 0 for a local plan
    and lossless codecs, None when unmeasured (a plan only an explicit opt-in allows)."""
    micro_batches: int = 1
    """The batch runs as this many micro-batches (plan/pipeline.py), as costed: chosen per request where the
    engine leaves the count open (plan/micro.py); 1 for a local plan. Plan JSON written before this field
    loads as 1."""

    def __post_init__(self) -> None:
        # No counts at all: a candidate the planner could not split (`enumerate_candidates` lists it as excluded).
        if self.micro_batches < 1:
            raise ValueError(f"plan micro_batches must be >= 1, got {self.micro_batches}")
        if self.token_counts and len(self.token_counts) != len(self.ranks):
            raise ValueError(f"plan has {len(self.token_counts)} token counts {list(self.token_counts)} for "
                             f"{len(self.ranks)} ranks {list(self.ranks)}; give one per rank")
        object.__setattr__(self, "token_ranges", ranges_of(self.token_counts))  # frozen: set once, here

    def __str__(self) -> str:
        if self.mode == "local":
            how = "local on rank 0"
        else:
            loss = "unmeasured" if self.fidelity_loss is None else f"{self.fidelity_loss:.2%}"
            how = (f"distributed ranks={list(self.ranks)} tokens={list(self.token_counts)} codec={self.codec} "
                   f"cr={self.cr} wire={self.wire_dtype} fidelity loss {loss}"
                   + (f" micro-batches {self.micro_batches}" if self.micro_batches > 1 else ""))
        return (f"Plan[{how}; predicts {self.predicted_latency_s * 1e3:.1f} ms, {self.predicted_energy_j:.2f} J "
                f"({self.energy_source}); {self.reason}]")

    def to_dict(self) -> dict[str, Any]:
        return to_json_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """Strictly (`profile.jsondata`): unknown or missing fields and wrongly typed values are a ValueError."""
        try:
            return from_json_dict(cls, data, "plan")
        except ValueError as err:
            raise ValueError(f"not a plan: {err}") from None

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise ValueError(f"plan is not valid JSON: {err}") from None


@dataclass(frozen=True)
class Candidate:
    """One option the planner weighed: its plan, its prediction, and why it was excluded (None if not)."""

    plan: Plan
    prediction: Prediction | None
    excluded: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(),
                "prediction": None if self.prediction is None else self.prediction.to_dict(),
                "excluded": self.excluded}
