"""The cost model: predicted latency and energy of a plan, from the profile alone. Pure arithmetic over the
profile's numbers as `CostConstants` (read once: plan/constants.py).

Local (rank 0 alone):
    compute_s = (L · t_layer(B, N, N) + request_overhead_s) / speed_0;  energy = compute_w · compute_s.

Distributed over k ranks owning n_p tokens, per layer:
    S_q      = codec.num_vectors(n_q)                 vectors rank q sends per row, asked of the codec
                                                      (Segment Means: ceil(n_q / cr) + anchor slots)
    K_q      = codec.kv_tokens(n_q)                   of them, tokens sent as keys and values (a kv share,
                                                      compress/kvshare.py; 0 for every other codec)
    W_q      = S_q + K_q                              vectors on the wire (a key and a value per K_q token)
    msg_q    = B · (wire_bytes_per_row + n_q · wire_bytes_per_token)   (a kv share: W_q · n_ref / W(n_ref)
                                                      in place of n_q, its rounding of K_q per message)
    kv_p     = n_p + sum_{q != p} S_q                 (decoders: q < p only — partition-aware causal mask)
    spared_p = per_kv_s · B · sum_{q != p} K_q        the received tokens' K/V projections a kv share spares
    codec_p  = B · (encode_s · W_p + decode_s · sum_{q != p} W_q) - spared_p   the codec's own compute: rank p
                                                      encodes its message and decodes each one it reads (the
                                                      profile's `encode_s_per_vector` / `decode_s_per_vector`,
                                                      at speed 1), less what it spares
    compute  = max_p (t_layer(B, n_p, kv_p) + codec_p) / speed_p
    staging  = max_p d2h(msg_p) + h2d(sum_{q != p} msg_q)      (0 where the profile has no staging)
    network  = 8 · max(0, (k-1) · max_q msg_q - credit) / bandwidth
                                                         (GLOO all-gather pads every message to the largest;
                                                          shared medium: k times that, all ranks share the air;
                                                          credit = min(burst, bandwidth/8 · layer compute): a
                                                          token-bucket link refills while the layer computes)
    latency  = (k - 1) · link latency                    (ring all-gather: k - 1 hops; decoders: 1 forward hop)
and once per request: a control header (one hop), the scatter of raw inputs from rank 0 (one message per
other rank, B · input_bytes_per_token · (N - n_0) bytes), and the outputs to rank 0 (a sum-reduce of
k - 1 hops; decoders: one message), B · output_bytes_per_row per other rank — see `message_rounds`;
each of the two after an idle link, so less a full burst.
Overlap (`CostConstants.overlap`, `micro_batches`; plan/pipeline.py): per layer the critical path is
    max(C, (C - own) / m + x, m · x)    instead of C + network + latency,
C the slowest rank's layer compute (m micro-batches pay the fixed cost m times), own its own-key work
(Q/K/V projections of its n_own tokens and their attention: B · n_own · (1.5 · per_kv_s + per_token_kv_s ·
n_own); 0 without overlap; a kv share projects its own K/V before the send: 0.5 · per_kv_s), x one
micro-batch's exchange (network / m + hops · link latency). What this hides comes off network_s first, then off
latency_s (both stay critical-path seconds). Kv-share codecs run only there (encoders, overlap on:
`CostConstants.kv_share`); the planner skips them elsewhere.
The planner prunes with lower bounds (`group_bound`, `GroupTerms.min_total_s`): per rank base + slope · n plus
the least any candidate codec adds (`codec_received_s`: its received vectors less what a kv share spares).
Sealed lanes (`LinkEstimate.sealed`, with the profile's measured `sealing` cost): every message carries
`overhead_bytes` more (msg_q += overhead), and each rank seals its message and opens the k - 1 it
receives per layer — half of (per_message_s · k + per_byte_s · sum_q msg_q), the profile having measured
a seal + open pair; charged as staging (CPU work on the wire bytes) — plus a pair for each of the scatter's
and the outputs' 2 (k - 1) messages once per request.
The terms add up (the per-layer maxima are taken term by term, a slight over-estimate when the slowest
computer is not the slowest stager). Energy sums over the plan's ranks: compute_w, staging_w and
network_w over each phase and idle_w while waiting for the slowest rank; devices outside the plan are
not charged (they are free for other work).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from edgeprism.partition.ranges import apportion
from edgeprism.plan.constants import CostConstants, profile_constants, request_constants
from edgeprism.plan.pipeline import own_key_s, pipelined_layers
from edgeprism.plan.types import LinkEstimate, Plan, Prediction, Request
from edgeprism.plan.vectors import (
    codec_compute_s,
    codec_layer_s,
    codec_received_s,
    padded_received_bytes,
    received_vectors,
)
from edgeprism.profile.schema import CodecFidelity, Profile


class GroupTerms(NamedTuple):
    """What one rank group with one token split costs whatever the codec (`group_terms`)."""

    counts: tuple[int, ...]
    base: list[float]
    """Per rank: layer seconds before K/V vectors (fixed + own tokens), at the rank's speed."""
    slope: list[float]
    """Per rank: layer seconds per K/V vector, at the rank's speed."""
    n_min: int
    n_max: int
    num_tokens: int
    overhead_s: float
    setup_network_s: float
    latency_s: float
    setup_wire_bytes: float
    min_total_s: float
    """Lower bound of the latency over the codecs the bound was taken for."""
    min_energy_j: float
    setup_seal_s: float = 0.0
    """Sealing and opening the scatter's and the outputs' messages (0 unless sealed)."""
    fixed: tuple[float, ...] = ()
    """Per rank: the layer's fixed seconds (paid once per micro-batch), at the rank's speed."""
    own: tuple[float, ...] = ()
    """Per rank: the layer's own-key seconds, what may run beside the exchange (plan/pipeline.py `own_key_s`)."""
    layer_latency_s: float = 0.0
    """One layer's exchange hops × link latency."""
    speeds: tuple[float, ...] = ()
    """Per rank: its speed (the codec's own compute is charged at it, `codec_compute_s`)."""


class CodecTerms(NamedTuple):
    """Predicted terms of one group with one codec (`codec_terms`)."""

    compute_s: float
    staging_s: float
    network_s: float
    latency_s: float
    energy_j: float
    wire_bytes: float


def token_shares(speeds: Sequence[float]) -> tuple[float, ...]:
    """Fraction of the tokens per rank, proportional to measured speed."""
    total = sum(speeds)
    return tuple(s / total for s in speeds)


def local_terms(profile: Profile, batch: int, num_tokens: int, compute_scale: float = 1.0) -> tuple[float, float]:
    """-> (compute_s, energy_j) of rank 0 running the reference model alone; `compute_scale` is the live
    correction `LinkEstimate.local_compute_scale`."""
    c = profile.compute
    layer_s = c.layer_seconds(batch, num_tokens, num_tokens)
    compute_s = compute_scale * (profile.model.num_layers * layer_s + c.request_overhead_s) / profile.device_speeds[0]
    return compute_s, profile.energy.compute_w * compute_s


def message_rounds(num_layers: int, k: int, causal: bool) -> int:
    """Sequential link latencies a distributed request pays, as the runtime sends them: the header
    broadcast, one scatter message per other rank, the per-layer exchanges and the output collection."""
    if k <= 1:
        return 0
    layer_hops = 1 if causal else k - 1  # decoders send forward in parallel; all-gather rings k - 1 hops
    output_hops = 1 if causal else k - 1  # the last rank's row / a reduce to rank 0
    return 1 + (k - 1) + num_layers * layer_hops + output_hops


def group_bound(constants: CostConstants, batch: int, num_tokens: int, speeds: Sequence[float],
                link_latency_s: float) -> tuple[float, float]:
    """Lower bounds of (latency_s, energy_j) of any plan over ranks of these speeds, before splitting tokens.

    The slowest rank's layer time is at least the speed-weighted mean of all ranks' (which the
    proportional split makes exact up to rounding), kv >= own tokens, and sum n_p² >= N² / k."""
    c = constants
    num_layers, a, b_tok, b_kv, b_tok_kv = c.num_layers, c.fixed_s, c.per_token_s, c.per_kv_s, c.per_token_kv_s
    overhead, compute_w, network_w = c.request_overhead_s, c.compute_w, c.network_w
    k = len(speeds)
    work = k * a + (b_tok + b_kv) * batch * num_tokens + b_tok_kv * batch * num_tokens * num_tokens / k
    latency_s = message_rounds(num_layers, k, c.causal) * link_latency_s
    overhead_s = overhead / speeds[0]
    hideable_s = num_layers * (k - 1) * link_latency_s if c.pipelined else 0.0  # per-layer hops may hide
    min_total_s = num_layers * work / sum(speeds) + overhead_s + latency_s - hideable_s
    min_energy_j = compute_w * (num_layers * work / max(speeds) + overhead_s) + network_w * k * latency_s
    return min_total_s, min_energy_j


def group_terms(constants: CostConstants, batch: int, speeds: Sequence[float], counts: Sequence[int],
                bandwidth_bps: float, link_latency_s: float, codecs: Sequence[CodecFidelity] = ()) -> GroupTerms:
    """What a rank group costs whatever the codec. Per rank, layer seconds = base + slope · kv; plus the
    codec-independent link terms and lower bounds of time and energy over `codecs` (for the planner's
    pruning: each rank receives at least the fewest vectors any of them sends; none given: 0)."""
    c = constants
    num_layers, causal, a, b_tok, b_kv, b_tok_kv = (c.num_layers, c.causal, c.fixed_s, c.per_token_s, c.per_kv_s,
                                                    c.per_token_kv_s)
    overhead, in_bytes, out_bytes = c.request_overhead_s, c.input_bytes_per_token, c.output_bytes_per_row
    compute_w, network_w, burst = c.compute_w, c.network_w, c.burst_bytes
    k = len(counts)
    num_tokens = sum(counts)
    token_s, kv_s, token_kv_s = b_tok * batch, b_kv * batch, b_tok_kv * batch
    base = []
    slope = []
    for n, speed in zip(counts, speeds):
        base.append((a + token_s * n) / speed)
        slope.append((kv_s + token_kv_s * n) / speed)
    # a lower bound of each rank's layer seconds: the least any codec adds to base + slope · n (its received
    # vectors, less the K/V projections a kv share spares; encode/decode seconds are >= 0)
    plain = [codec for codec in codecs if not codec.kv_share]
    fewest = [min((codec.num_vectors(n) for codec in plain), default=0) for n in counts]  # per sender
    least = [s * r for s, r in zip(slope, received_vectors(fewest, causal))] if plain or not codecs else None
    for codec in codecs:
        if codec.kv_share:
            added = codec_received_s(codec, kv_s, slope, counts, speeds, causal)
            least = added if least is None else [min(x, y) for x, y in zip(least, added)]
    assert least is not None
    own_layer_s = [b + s * n + x for b, s, n, x in zip(base, slope, counts, least)]
    overhead_s = overhead / speeds[0]
    scatter_bytes = batch * in_bytes * (num_tokens - counts[0]) + (k - 1) * c.seal_bytes
    gather_bytes = (batch * out_bytes + c.seal_bytes) * (k - 1)
    setup_seal_s = 2 * (k - 1) * c.seal_message_s + c.seal_byte_s * (scatter_bytes + gather_bytes)
    setup_network_s = 8.0 * (max(0.0, scatter_bytes - burst) + max(0.0, gather_bytes - burst)) / bandwidth_bps
    latency_s = message_rounds(num_layers, k, causal) * link_latency_s
    layer_latency_s = (1 if causal else k - 1) * link_latency_s
    hideable_s = num_layers * layer_latency_s if c.pipelined else 0.0  # per-layer hops may hide behind compute
    min_total_s = num_layers * max(own_layer_s) + overhead_s + setup_network_s + latency_s - hideable_s
    min_energy_j = (compute_w * (num_layers * sum(own_layer_s) + overhead_s)
                    + network_w * k * (setup_network_s + latency_s))
    setup_wire_bytes = max(batch * in_bytes * max(counts[1:]), gather_bytes)
    return GroupTerms(tuple(counts), base, slope, min(counts), max(counts), num_tokens, overhead_s, setup_network_s,
                      latency_s, setup_wire_bytes, min_total_s, min_energy_j, setup_seal_s,
                      fixed=tuple(a / speed for speed in speeds), layer_latency_s=layer_latency_s, speeds=tuple(speeds),
                      own=tuple(own_key_s(b_kv, b_tok_kv, batch, n) / speed for n, speed in zip(counts, speeds)))


def codec_terms(constants: CostConstants, group: GroupTerms, batch: int, codec: CodecFidelity, bandwidth_bps: float,
                objective: str | None = None, beat: float = float("inf")) -> CodecTerms | None:
    """-> (compute_s, staging_s, network_s, latency_s, energy_j, wire_bytes) of one group with one codec.
    The planner's hot loop: link and staging in closed form, then one pass over the ranks for compute.
    With an `objective`, returns None as soon as a lower bound of its score is >= `beat`."""
    c, g = constants, group
    num_layers, causal, staged, shared, burst = c.num_layers, c.causal, c.staged, c.shared_medium, c.burst_bytes
    stage_lat_s, d2h_s_per_byte, h2d_s_per_byte = c.stage_latency_s, c.d2h_s_per_byte, c.h2d_s_per_byte
    idle_w, compute_w, staging_w, network_w = c.idle_w, c.compute_w, c.staging_w, c.network_w
    counts, base, slope, n_min, n_max, num_tokens = g.counts, g.base, g.slope, g.n_min, g.n_max, g.num_tokens
    overhead_s, setup_network_s, latency_s = g.overhead_s, g.setup_network_s, g.latency_s
    setup_wire_bytes, min_total_s, min_energy_j = g.setup_wire_bytes, g.min_total_s, g.min_energy_j
    k = len(counts)
    row_bytes = batch * codec.wire_bytes_per_row + c.seal_bytes  # per message: sealing's nonce and tag too
    token_bytes = batch * codec.wire_bytes_per_token
    kv_share = codec.kv_share
    if kv_share:  # its keys-and-values tokens are rounded per message: weigh each message exactly
        wire_tokens = codec.wire_tokens
        w_min, w_max, w_all = wire_tokens(n_min), wire_tokens(n_max), sum(wire_tokens(n) for n in counts)
    else:
        w_min, w_max, w_all = n_min, n_max, num_tokens

    total_message = k * row_bytes + token_bytes * w_all
    max_received = padded_received_bytes(codec, batch, w_max, k, c.seal_bytes)
    air = k if shared else 1
    # with the whole burst as credit: a lower bound, refined below once the layer's compute is known
    layer_network_s = 8.0 * air * max(0.0, max_received - burst) / bandwidth_bps
    if staged:
        # d2h(msg_p) + h2d(total - msg_p) is linear in msg_p: its maximum is at the smallest or largest message
        small, large = row_bytes + token_bytes * w_min, row_bytes + token_bytes * w_max
        layer_staging_s = stage_lat_s + max(d2h_s_per_byte * small + h2d_s_per_byte * (total_message - small),
                                            d2h_s_per_byte * large + h2d_s_per_byte * (total_message - large))
        sum_staging_s = num_layers * (k * stage_lat_s + d2h_s_per_byte * total_message
                                      + h2d_s_per_byte * (k - 1) * total_message)
    else:
        layer_staging_s = sum_staging_s = 0.0
    if c.seal_message_s or c.seal_byte_s:
        # The profile measured a seal + open pair; per layer a rank seals its message and opens k - 1: about
        # half a pair per message it touches, i.e. half of the pairs of all k messages.
        layer_seal_s = 0.5 * (c.seal_message_s * k + c.seal_byte_s * total_message)
        layer_staging_s += layer_seal_s
        sum_staging_s += num_layers * k * layer_seal_s + g.setup_seal_s
    if objective is not None:  # pipelined, the network may hide behind compute: only staging adds for sure
        bound_s = min_total_s + num_layers * (layer_staging_s + (0.0 if c.pipelined else layer_network_s))
        bound_j = min_energy_j + network_w * k * num_layers * layer_network_s + staging_w * sum_staging_s
        if objective_score(objective, bound_s, bound_j) >= beat:
            return None

    num_vectors = codec.num_vectors
    segments = [num_vectors(n) for n in counts]  # vectors each rank's message carries per row, per the codec
    received = received_vectors(segments, causal)
    coded = codec_layer_s(codec, c.per_kv_s, batch, counts, segments, received, g.speeds, causal)
    if c.exchange_s_per_byte:  # the network stack's share of each rank's cores (profile/exchange_cost.py)
        lost = c.exchange_s_per_byte * max_received
        coded = [(coded[p] if coded else 0.0) + lost / g.speeds[p] for p in range(k)]
    max_layer_s = 0.0
    sum_layer_s = 0.0
    for p in range(k):
        layer_s = base[p] + slope[p] * (counts[p] + received[p]) + (coded[p] if coded else 0.0)
        sum_layer_s += layer_s
        if layer_s > max_layer_s:
            max_layer_s = layer_s

    if burst > 0.0:  # the bucket refills at the link rate while the layer computes
        credit = min(burst, bandwidth_bps / 8.0 * max_layer_s)
        layer_network_s = 8.0 * air * max(0.0, max_received - credit) / bandwidth_bps
    layer_hidden_s = 0.0
    if c.pipelined:
        m = min(c.micro_batches, batch)
        own: Sequence[float] = g.own if c.overlap else ()
        if own and kv_share:  # the own K/V projections run before the send (plan/pipeline.py `own_key_s`)
            own = [own_key_s(c.per_kv_s, c.per_token_kv_s, batch, n, kv_share=True) / speed
                   for n, speed in zip(counts, g.speeds)]
        max_layer_s, sum_layer_s, layer_hidden_s = pipelined_layers(
            g.base, g.slope, g.fixed, own, counts, received, m, layer_network_s, g.layer_latency_s, coded)
        latency_s += num_layers * (m - 1) * g.layer_latency_s  # every micro-batch pays its hops
    compute_s = num_layers * max_layer_s + overhead_s
    staging_s = num_layers * layer_staging_s + g.setup_seal_s
    network_s = num_layers * layer_network_s + setup_network_s
    link_s = network_s + latency_s  # the link's busy time, hidden or not
    hidden_network_s = min(num_layers * layer_hidden_s, num_layers * layer_network_s)
    network_s -= hidden_network_s  # critical-path seconds: what compute did not hide, network first
    latency_s -= num_layers * layer_hidden_s - hidden_network_s
    total_s = compute_s + staging_s + network_s + latency_s
    # Every rank is busy computing, staging or on the link, and idle for the rest of total_s
    # (never negative: each rank's phases are bounded by the critical-path terms; overlapped phases count once).
    sum_compute_s = num_layers * sum_layer_s + overhead_s
    energy_j = (compute_w * sum_compute_s + staging_w * sum_staging_s + network_w * k * link_s
                + idle_w * max(0.0, k * total_s - sum_compute_s - sum_staging_s - k * link_s))
    wire_bytes = num_layers * max_received + setup_wire_bytes
    return CodecTerms(compute_s, staging_s, network_s, latency_s, energy_j, wire_bytes)


def distributed_terms(profile: Profile, batch: int, speeds: Sequence[float], counts: Sequence[int],
                      codec: CodecFidelity, bandwidth_bps: float, link_latency_s: float,
                      sealed: bool = False, overlap: bool = False, micro_batches: int = 1,
                      input_bytes_per_token: float | None = None) -> CodecTerms:
    """-> (compute_s, staging_s, network_s, latency_s, energy_j, wire_bytes); speeds and counts are per
    rank of the plan, rank 0 (the coordinator) first; `sealed`: the lanes are sealed; `overlap`,
    `micro_batches`: how the runtime hides the exchange (plan/pipeline.py); `input_bytes_per_token`: the
    request's own scatter bytes (`Request.input_bytes_per_token`; None: the profile's)."""
    constants = request_constants(profile_constants(profile, sealed, overlap, micro_batches), input_bytes_per_token)
    group = group_terms(constants, batch, speeds, counts, bandwidth_bps, link_latency_s)
    terms = codec_terms(constants, group, batch, codec, bandwidth_bps)
    assert terms is not None  # no objective, no pruning
    return terms


def rank_compute_s(profile: Profile, batch: int, counts: Sequence[int], codec: CodecFidelity) -> list[float]:
    """Predicted compute seconds of each rank of a plan at speed 1.0 (the same layer formula as
    `codec_terms`, the codec's own encode/decode included; rank 0 also pays the request overhead). Measured
    seconds over these give a device's live speed (`runtime.compute_estimate`)."""
    constants = profile_constants(profile)
    k = len(counts)
    group = group_terms(constants, batch, [1.0] * k, counts, 1.0, 0.0)
    segments = [codec.num_vectors(n) for n in counts]
    received = received_vectors(segments, constants.causal)
    coded = codec_layer_s(codec, constants.per_kv_s, batch, counts, segments, received, [1.0] * k,
                          constants.causal) or [0.0] * k
    if constants.exchange_s_per_byte:  # as codec_terms: every rank receives the padded messages
        lost = constants.exchange_s_per_byte * padded_received_bytes(codec, batch, codec.wire_tokens(max(counts)), k)
        coded = [x + lost for x in coded]
    return [constants.num_layers * (group.base[p] + group.slope[p] * (counts[p] + received[p]) + coded[p])
            + (constants.request_overhead_s if p == 0 else 0.0) for p in range(k)]


def num_exchanges(profile: Profile) -> int:
    """Collective rounds of a distributed request: the header, the scatter, one exchange per layer and
    the output collection."""
    return profile.model.num_layers + 3


def predict(profile: Profile, request: Request, plan: Plan, link: LinkEstimate) -> Prediction:
    """Predicted latency and energy of running `request` per `plan` (its predicted_* fields are ignored)."""
    if request.model_name != profile.model.name:
        raise ValueError(f"request is for model {request.model_name}, the profile for {profile.model.name}")
    if plan.mode == "local":
        scale = 1.0 if link.device_speed_scale is None else link.device_speed_scale[0]
        compute_s, energy_j = local_terms(profile, request.batch, request.num_tokens,
                                          link.local_compute_scale / scale)
        return local_prediction(compute_s, energy_j, profile.energy.source)
    if not plan.ranks or plan.ranks[0] != 0 or len(set(plan.ranks)) != len(plan.ranks):
        raise ValueError(f"plan ranks {plan.ranks} must be distinct and start with the coordinator, rank 0")
    if any(not 0 <= r < profile.world_size for r in plan.ranks):
        raise ValueError(f"plan ranks {plan.ranks} are outside the profile's world size {profile.world_size}")
    if len(plan.token_counts) != len(plan.ranks) or sum(plan.token_counts) != request.num_tokens:
        raise ValueError(f"plan token counts {plan.token_counts} do not split {request.num_tokens} tokens "
                         f"over ranks {plan.ranks}")
    live_speeds = link.effective_speeds(profile.device_speeds)
    speeds = [live_speeds[r] for r in plan.ranks]
    terms = distributed_terms(profile, request.batch, speeds, plan.token_counts, profile.codec(plan.codec),
                              link.bandwidth_bps, link.latency_s, link.sealed, link.overlap, link.micro_batches,
                              request.input_bytes_per_token)
    return distributed_prediction(terms, profile)


def local_prediction(compute_s: float, energy_j: float, energy_source: str) -> Prediction:
    """Rank 0 alone: compute only, no exchange."""
    return Prediction(compute_s=compute_s, staging_s=0.0, network_s=0.0, latency_s=0.0, energy_j=energy_j,
                      energy_source=energy_source, exchanges=0, wire_bytes=0.0)


def distributed_prediction(terms: CodecTerms, profile: Profile) -> Prediction:
    return Prediction(compute_s=terms.compute_s, staging_s=terms.staging_s, network_s=terms.network_s,
                      latency_s=terms.latency_s, energy_j=terms.energy_j, energy_source=profile.energy.source,
                      exchanges=num_exchanges(profile), wire_bytes=terms.wire_bytes)


def objective_score(objective: str, latency_s: float, energy_j: float) -> float:
    if objective == "latency":
        return latency_s
    if objective == "energy":
        return energy_j
    return latency_s * energy_j  # edp


__all__ = [
    "CodecTerms",
    "CostConstants",
    "GroupTerms",
    "apportion",
    "codec_compute_s",
    "codec_layer_s",
    "codec_received_s",
    "codec_terms",
    "distributed_prediction",
    "distributed_terms",
    "group_terms",
    "local_prediction",
    "local_terms",
    "num_exchanges",
    "objective_score",
    "predict",
    "profile_constants",
    "rank_compute_s",
    "received_vectors",
    "token_shares",
]
