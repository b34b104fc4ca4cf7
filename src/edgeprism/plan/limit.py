"""The physical limit of a split, per point: how fast a plan could possibly run on these devices and this link.

From the profile alone (pure arithmetic, like the cost model), for a plan over P ranks of relative speeds s_p:

    compute_s  = one device's compute for the request (rank 0's profiled time) × s_0 / Σ s_p
                 (a perfect split: no duplicated K/V work, no per-layer overhead, all ranks busy)
    wire_s     = the wire bytes the busiest rank receives over the request with the plan's codec, at the link's rate
                 (the cost model's network term: less a token bucket's burst, the air shared on a shared medium)
    latency_s  = message rounds × link latency (header, scatter, one exchange per layer, output; plan/cost.py)

    limit_s            = max(compute_s, wire_s) + latency_s     (exchange fully overlapped with compute)
    sequential_limit_s = compute_s + wire_s + latency_s          (no overlap)

A local plan's limit is its compute. `achieved / limit` in the tables is limit_s / measured latency (1.0: at the
limit). With compression the ranks also compute less than a full split (fewer K/V rows), so a lossy plan can beat
this limit; for full exchange it bounds the cost model's prediction. compute_to_comm = compute_s / (wire_s +
latency_s) carries a result to other hardware: a Jetson
computes far faster on the same link, so its ratio, and what splitting can buy, is smaller.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgeprism.plan.cost import distributed_terms, local_terms, message_rounds
from edgeprism.plan.types import LinkEstimate, Plan, Request
from edgeprism.profile.schema import Profile


@dataclass(frozen=True)
class SplitLimit:
    compute_s: float
    wire_s: float
    latency_s: float

    @property
    def limit_s(self) -> float:
        return max(self.compute_s, self.wire_s) + self.latency_s

    @property
    def sequential_limit_s(self) -> float:
        return self.compute_s + self.wire_s + self.latency_s

    @property
    def compute_to_comm(self) -> float | None:
        comm = self.wire_s + self.latency_s
        return self.compute_s / comm if comm > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "limit_s": self.limit_s, "sequential_limit_s": self.sequential_limit_s,
                "compute_to_comm": self.compute_to_comm}


def split_limit(profile: Profile, request: Request, plan: Plan, link: LinkEstimate) -> SplitLimit:
    """The limit of `plan` for `request` over `link` (see the module docstring)."""
    one_device_s, _ = local_terms(profile, request.batch, request.num_tokens)
    if plan.mode == "local":
        return SplitLimit(one_device_s, 0.0, 0.0)
    speeds = [profile.device_speeds[r] for r in plan.ranks]
    compute_s = one_device_s * profile.device_speeds[0] / sum(speeds)
    terms = distributed_terms(profile, request.batch, speeds, plan.token_counts, profile.codec(plan.codec),
                              link.bandwidth_bps, link.latency_s, input_bytes_per_token=request.input_bytes_per_token)
    rounds = message_rounds(profile.model.num_layers, len(plan.ranks), profile.model.causal)
    return SplitLimit(compute_s, terms.network_s, rounds * link.latency_s)


__all__ = ["SplitLimit", "split_limit"]
