"""The profile read once for the cost model: `CostConstants`, the plain floats the planner's hot loop needs
(layer-time coefficients, staging rates, link and energy figures, what sealing adds), and
`profile_constants(profile, sealed, overlap, micro_batches)`, which reads them out of a `Profile` together
with how the runtime will run (sealed lanes, overlapped exchange, micro-batches). The arithmetic over them
is plan/cost.py (its docstring has the formulas); plan/shares.py uses them to balance a split.
"""

from __future__ import annotations

from typing import NamedTuple

from edgeprism.partition.kvwire import kv_share_refusal
from edgeprism.profile.schema import Profile


class CostConstants(NamedTuple):
    """The profile's numbers the planner's hot loop needs, read once per profile (plain floats)."""

    num_layers: int
    causal: bool
    fixed_s: float
    per_token_s: float
    per_kv_s: float
    per_token_kv_s: float
    request_overhead_s: float
    staged: bool
    stage_latency_s: float
    """d2h + h2d latency of one exchange's staging copies."""
    d2h_s_per_byte: float
    h2d_s_per_byte: float
    shared_medium: bool
    input_bytes_per_token: float
    output_bytes_per_row: float
    idle_w: float
    compute_w: float
    staging_w: float
    network_w: float
    burst_bytes: float
    seal_bytes: float = 0.0
    """Bytes sealing adds to a message (0: lanes not sealed, or the profile has no sealing cost)."""
    seal_message_s: float = 0.0
    seal_byte_s: float = 0.0
    overlap: bool = False
    """The runtime overlaps each layer's exchange with its own-key attention (encoders only)."""
    micro_batches: int = 1
    """The runtime splits a batch into this many micro-batches (at most one per row; encoders only)."""
    exchange_s_per_byte: float = 0.0
    """Compute seconds a rank loses per byte it receives in a layer's all-gather, at speed 1
    (`LinkMeasurement.exchange_compute_s_per_byte`; 0: not measured)."""
    kv_share: bool = False
    """The runtime can run kv-share codecs (compress/kvshare.py): an encoder on the overlapped path
    (`partition.kvwire.kv_share_refusal`). Elsewhere the planner never chooses one."""

    @property
    def pipelined(self) -> bool:
        """Whether a layer's exchange may hide behind compute (plan/pipeline.py)."""
        return self.overlap or self.micro_batches > 1



def profile_constants(profile: Profile, sealed: bool = False, overlap: bool = False,
                      micro_batches: int = 1) -> CostConstants:
    """The profile's numbers the hot loop needs, read once per planner call; `sealed`: the lanes are sealed
    (charged when the profile measured what that costs); `overlap`, `micro_batches`: how the runtime hides the
    exchange (plan/pipeline.py; decoders do neither); kv-share codecs need `overlap` on an encoder."""
    c, st, e, seal = profile.compute, profile.staging, profile.energy, profile.sealing
    charged = sealed and seal is not None
    return CostConstants(
        num_layers=profile.model.num_layers, causal=profile.model.causal, fixed_s=c.fixed_s,
        per_token_s=c.per_token_s, per_kv_s=c.per_kv_s, per_token_kv_s=c.per_token_kv_s,
        request_overhead_s=c.request_overhead_s, staged=st.present,
        stage_latency_s=st.d2h_latency_s + st.h2d_latency_s,
        d2h_s_per_byte=8.0 / st.d2h_bandwidth_bps if st.present else 0.0,
        h2d_s_per_byte=8.0 / st.h2d_bandwidth_bps if st.present else 0.0,
        shared_medium=profile.link.medium == "shared", input_bytes_per_token=profile.input_bytes_per_token,
        output_bytes_per_row=profile.output_bytes_per_row, idle_w=e.idle_w, compute_w=e.compute_w,
        staging_w=e.staging_w, network_w=e.network_w, burst_bytes=profile.link.burst_bytes,
        seal_bytes=float(seal.overhead_bytes) if charged else 0.0,  # type: ignore[union-attr]
        seal_message_s=seal.per_message_s if charged else 0.0,  # type: ignore[union-attr]
        seal_byte_s=seal.per_byte_s if charged else 0.0,  # type: ignore[union-attr]
        overlap=overlap and not profile.model.causal,
        micro_batches=1 if profile.model.causal else max(1, micro_batches),
        kv_share=kv_share_refusal(profile.model, overlap) is None,
        exchange_s_per_byte=profile.link.exchange_compute_s_per_byte)


def request_constants(constants: CostConstants, input_bytes_per_token: float | None) -> CostConstants:
    """`constants` with a request's own scatter bytes per token (`Request.input_bytes_per_token`) where it has them."""
    if input_bytes_per_token is None:
        return constants
    return constants._replace(input_bytes_per_token=input_bytes_per_token)


__all__ = ["CostConstants", "profile_constants", "request_constants"]
