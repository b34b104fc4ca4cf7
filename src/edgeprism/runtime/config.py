"""How the engine plans and protects itself: `EngineConfig` (times in seconds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgeprism.partition.transform import DEFAULT_OVERLAP, DEFAULT_SIZE_AWARE
from edgeprism.plan import DEFAULT_MAX_FIDELITY_LOSS, Limits


@dataclass(frozen=True)
class EngineConfig:
    """How the engine plans and protects itself. Times in seconds."""

    objective: Literal["latency", "energy", "edp"] = "latency"
    max_fidelity_loss: float | None = DEFAULT_MAX_FIDELITY_LOSS
    """Largest normalised metric loss a codec may have, as measured for this model (default 1 %; None: any
    measured loss)."""
    allow_unmeasured_codecs: bool = False
    """Opt in to codecs whose fidelity for this model was never measured (random-weight demos, benchmarks
    of speed only). Off by default: an answer is never traded for speed silently."""
    codecs: tuple[str, ...] = ()
    """Plan only with these of the profile's codecs (empty: any), e.g. the quantising family a benchmark
    opts in to; the fidelity budget still applies to them."""
    max_latency_s: float | None = None
    max_batch: int = 32
    """Requests with more rows are refused (ValueError for that request)."""
    learn_compute: bool = False
    """Re-estimate online how far local vs distributed compute runs from the profile's prediction
    (`LinkEstimate.local_compute_scale`). Off by default: it corrects local relative to distributed
    compute only, and when the distributed prediction is stale too (network terms included) it tipped
    plans to local where Segment Means was 15-30 % faster (benchmarks, README). On = opt in."""
    learn_link: bool = True
    """Re-estimate the link from every distributed request's exchanges and from probes (off: plan by the
    profile's link alone, e.g. a fixed wired link or a test that must not depend on this host's noise)."""
    overlap: bool = DEFAULT_OVERLAP
    """Overlap each encoder layer's exchange with the own-token attention (partition/overlap.py; exact)."""
    micro_batches: int | None = None
    """Run an encoder's batch as this many micro-batches, one exchanging while another computes
    (partition/microbatch.py; exact; with `overlap` only). None: per request, the count of
    `plan.micro.MICRO_BATCH_CHOICES` (2 or 4, at most the batch; 1 at batch 1) the cost model finds best
    (plan/pipeline.py, plan/micro.py); the plan records it."""
    learn_speeds: bool = True
    """Estimate each device's compute speed from its timings in every distributed request, so that a
    device slowed since profiling (a straggler) is re-shared or left out, and taken back once restored
    (`runtime.compute_estimate`)."""
    size_aware: bool = DEFAULT_SIZE_AWARE
    """log(count) logit bias for received means (the measured default; see partition.transform)."""
    blow_factor: float = 2.0
    """A request whose latency exceeds this × its prediction is logged as a warning."""
    probe_every: int = 8
    """After this many local plans in a row, measure the link with a small probe (0: never), so that a
    link that got faster can win back distributed plans."""
    probe_nbytes: int = 64 * 1024
    idle_timeout_s: float = 7 * 24 * 3600.0
    """How long idle workers wait for the next control message."""
    history: int = 1000
    """Metrics rows kept in `Engine.history`."""
    stall_factor: float = 5.0
    min_stall_s: float = 2.0
    """A distributed request is given up (and rerun locally) after max(min_stall_s, stall_factor ×
    its predicted latency): the bound on the stall a lost peer causes."""
    regroup_timeout_s: float = 5.0
    """How long a liveness round waits for workers to answer (plus the failed request's stall), and how
    long connecting an epoch's groups may take."""
    group_timeout_s: float = 30.0
    """GLOO's own timeout on the lanes: only the backstop behind the per-request deadline."""
    join_check_s: float = 1.0
    """How often rank 0 looks, between requests, for workers (re)joining."""
    start_timeout_s: float = 300.0
    """How long rank 0 waits for every worker to join at start."""
    seal_lanes: Literal["auto", "on", "off"] = "auto"
    """Seal every data-lane message with an AEAD keyed per lane and epoch (edgeprism.comm.sealing,
    docs/SECURITY.md). auto: on unless the lanes listen on loopback; on needs a cluster secret."""
    wait_for_workers: bool = True
    """Rank 0 waits at start until every rank has joined (a local cluster, torchrun). Off for a
    coordinator that devices join over the network whenever they come: it serves alone (locally) until
    they do, and takes each one in between two requests."""

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch {self.max_batch} must be >= 1")
        if self.micro_batches is not None and self.micro_batches < 1:
            raise ValueError(f"micro_batches {self.micro_batches} must be >= 1")
        if self.blow_factor <= 1:
            raise ValueError(f"blow_factor {self.blow_factor} must be > 1")
        if self.probe_every < 0 or self.probe_nbytes < 1:
            raise ValueError(f"probe_every {self.probe_every} must be >= 0 and probe_nbytes {self.probe_nbytes} >= 1")
        if self.stall_factor < 1 or self.min_stall_s <= 0:
            raise ValueError(f"stall_factor {self.stall_factor} must be >= 1 and min_stall_s {self.min_stall_s} > 0")
        for name in ("regroup_timeout_s", "group_timeout_s", "join_check_s", "start_timeout_s", "idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} {getattr(self, name)} must be > 0")
        if self.seal_lanes not in ("auto", "on", "off"):
            raise ValueError(f"seal_lanes {self.seal_lanes!r} must be one of auto, on, off")
        self.limits  # validates both  # noqa: B018

    @property
    def limits(self) -> Limits:
        return Limits(self.max_fidelity_loss, self.max_latency_s, self.allow_unmeasured_codecs,
                      tuple(self.codecs) or None)

    def stall_s(self, predicted_latency_s: float) -> float:
        return max(self.min_stall_s, self.stall_factor * predicted_latency_s)


__all__ = ["EngineConfig"]
