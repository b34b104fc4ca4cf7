"""The cost model: predicted latency and energy of a plan, from the profile alone. Pure arithmetic.

Local (rank 0 alone):
    compute_s = (L · t_layer(B, N, N) + request_overhead_s) / speed_0;  energy = compute_w · compute_s.

Distributed over k ranks owning n_p tokens, codec with segment size cr, per layer:
    S_q      = ceil(n_q / cr) + anchor slots           vectors rank q sends per row
    msg_q    = B · (wire_bytes_per_row + n_q · wire_bytes_per_token)
    kv_p     = n_p + sum_{q != p} S_q                 (decoders: q < p only — partition-aware causal mask)
    compute  = max_p t_layer(B, n_p, kv_p) / speed_p
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
The terms add up (the per-layer maxima are taken term by term, a slight over-estimate when the slowest
computer is not the slowest stager). Energy sums over the plan's ranks: compute_w, staging_w and
network_w over each phase and idle_w while waiting for the slowest rank; devices outside the plan are
not charged (they are free for other work).
"""

from __future__ import annotations

from collections.abc import Sequence

from edgeprism.plan.types import LinkEstimate, Plan, Prediction, Request
from edgeprism.profile.schema import CodecFidelity, Profile


def token_shares(speeds: Sequence[float]) -> tuple[float, ...]:
    """Fraction of the tokens per rank, proportional to measured speed."""
    total = sum(speeds)
    return tuple(s / total for s in speeds)


def apportion(num_tokens: int, speeds: Sequence[float]) -> tuple[int, ...]:
    """Whole tokens per rank, proportional to speed (largest remainder), every rank >= 1."""
    k = len(speeds)
    if num_tokens < k:
        raise ValueError(f"{num_tokens} tokens cannot give {k} ranks one token each")
    total = sum(speeds)
    ideal = [num_tokens * s / total for s in speeds]
    counts = [max(1, int(x)) for x in ideal]
    left = num_tokens - sum(counts)
    if left > 0:  # fewer than k left over: one each to the ranks furthest below their ideal (lowest index on ties)
        above = [c - x for c, x in zip(counts, ideal)]
        for j in sorted(range(k), key=above.__getitem__)[:left]:  # stable sort: lowest index on ties
            counts[j] += 1
    while left < 0:  # minimum-one bumps overshot: take one from the rank furthest above its ideal
        j = max((j for j in range(k) if counts[j] > 1), key=lambda j: (counts[j] - ideal[j], -j))
        counts[j] -= 1
        left += 1
    return tuple(counts)


def local_terms(profile: Profile, batch: int, num_tokens: int, compute_scale: float = 1.0) -> tuple[float, float]:
    """-> (compute_s, energy_j) of rank 0 running the reference model alone; `compute_scale` is the live
    correction `LinkEstimate.local_compute_scale`."""
    c = profile.compute
    layer_s = c.layer_seconds(batch, num_tokens, num_tokens)
    compute_s = compute_scale * (profile.model.num_layers * layer_s + c.request_overhead_s) / profile.device_speeds[0]
    return compute_s, profile.energy.compute_w * compute_s


def profile_constants(profile: Profile) -> tuple:
    """The profile's numbers the hot loop needs, read once per planner call (plain floats in a tuple)."""
    c, st, e = profile.compute, profile.staging, profile.energy
    return (profile.model.num_layers, profile.model.causal, c.fixed_s, c.per_token_s, c.per_kv_s,
            c.per_token_kv_s, c.request_overhead_s, st.present, st.d2h_latency_s + st.h2d_latency_s,
            8.0 / st.d2h_bandwidth_bps if st.present else 0.0, 8.0 / st.h2d_bandwidth_bps if st.present else 0.0,
            profile.link.medium == "shared", profile.input_bytes_per_token, profile.output_bytes_per_row,
            e.idle_w, e.compute_w, e.staging_w, e.network_w, profile.link.burst_bytes)


def message_rounds(num_layers: int, k: int, causal: bool) -> int:
    """Sequential link latencies a distributed request pays, as the runtime sends them: the header
    broadcast, one scatter message per other rank, the per-layer exchanges and the output collection."""
    if k <= 1:
        return 0
    layer_hops = 1 if causal else k - 1  # decoders send forward in parallel; all-gather rings k - 1 hops
    output_hops = 1 if causal else k - 1  # the last rank's row / a reduce to rank 0
    return 1 + (k - 1) + num_layers * layer_hops + output_hops


def group_bound(constants: tuple, batch: int, num_tokens: int, speeds: Sequence[float],
                link_latency_s: float) -> tuple[float, float]:
    """Lower bounds of (latency_s, energy_j) of any plan over ranks of these speeds, before splitting tokens.

    The slowest rank's layer time is at least the speed-weighted mean of all ranks' (which the
    proportional split makes exact up to rounding), kv >= own tokens, and sum n_p² >= N² / k."""
    (num_layers, causal, a, b_tok, b_kv, b_tok_kv, overhead, *_rest) = constants
    compute_w, network_w = constants[15], constants[17]
    k = len(speeds)
    work = k * a + (b_tok + b_kv) * batch * num_tokens + b_tok_kv * batch * num_tokens * num_tokens / k
    latency_s = message_rounds(num_layers, k, causal) * link_latency_s
    overhead_s = overhead / speeds[0]
    min_total_s = num_layers * work / sum(speeds) + overhead_s + latency_s
    min_energy_j = compute_w * (num_layers * work / max(speeds) + overhead_s) + network_w * k * latency_s
    return min_total_s, min_energy_j


def group_terms(constants: tuple, batch: int, speeds: Sequence[float], counts: Sequence[int],
                bandwidth_bps: float, link_latency_s: float, max_cr: int = 1 << 30, min_extra: int = 0) -> tuple:
    """What a rank group costs whatever the codec. Per rank, layer seconds = base + slope · kv; plus the
    codec-independent link terms and lower bounds of time and energy over codecs whose ratio is at most
    `max_cr` and whose anchor slots are at least `min_extra` (for the planner's pruning)."""
    (num_layers, causal, a, b_tok, b_kv, b_tok_kv, overhead, _, _, _, _, _, in_bytes, out_bytes,
     _, compute_w, _, network_w, burst) = constants
    k = len(counts)
    num_tokens = sum(counts)
    token_s, kv_s, token_kv_s = b_tok * batch, b_kv * batch, b_tok_kv * batch
    base = []
    slope = []
    for n, speed in zip(counts, speeds):
        base.append((a + token_s * n) / speed)
        slope.append((kv_s + token_kv_s * n) / speed)
    fewest = [min_extra - (-n // max_cr) for n in counts]  # fewest vectors any such codec sends per rank
    all_fewest = sum(fewest)
    own_layer_s = []  # a lower bound of each rank's layer seconds
    seen = 0
    for p in range(k):
        own_layer_s.append(base[p] + slope[p] * (counts[p] + (seen if causal else all_fewest - fewest[p])))
        seen += fewest[p]
    overhead_s = overhead / speeds[0]
    scatter_bytes = batch * in_bytes * (num_tokens - counts[0])
    gather_bytes = batch * out_bytes * (k - 1)
    setup_network_s = 8.0 * (max(0.0, scatter_bytes - burst) + max(0.0, gather_bytes - burst)) / bandwidth_bps
    latency_s = message_rounds(num_layers, k, causal) * link_latency_s
    min_total_s = num_layers * max(own_layer_s) + overhead_s + setup_network_s + latency_s
    min_energy_j = (compute_w * (num_layers * sum(own_layer_s) + overhead_s)
                    + network_w * k * (setup_network_s + latency_s))
    setup_wire_bytes = max(batch * in_bytes * max(counts[1:]), gather_bytes)
    return (tuple(counts), base, slope, min(counts), max(counts), num_tokens, overhead_s, setup_network_s,
            latency_s, setup_wire_bytes, min_total_s, min_energy_j)


def codec_terms(constants: tuple, group: tuple, batch: int, codec: CodecFidelity, bandwidth_bps: float,
                objective: str | None = None, beat: float = float("inf"),
                ) -> tuple[float, float, float, float, float, float] | None:
    """-> (compute_s, staging_s, network_s, latency_s, energy_j, wire_bytes) of one group with one codec.
    The planner's hot loop: link and staging in closed form, then one pass over the ranks for compute.
    With an `objective`, returns None as soon as a lower bound of its score is >= `beat`."""
    (num_layers, causal, _, _, _, _, _, staged, stage_lat_s, d2h_s_per_byte, h2d_s_per_byte, shared,
     _, _, idle_w, compute_w, staging_w, network_w, burst) = constants
    (counts, base, slope, n_min, n_max, num_tokens, overhead_s, setup_network_s, latency_s,
     setup_wire_bytes, min_total_s, min_energy_j) = group
    k = len(counts)
    cr, extra = codec.cr, codec.extra_vectors_per_row
    row_bytes = batch * codec.wire_bytes_per_row
    token_bytes = batch * codec.wire_bytes_per_token

    total_message = k * row_bytes + token_bytes * num_tokens
    # GLOO's all-gather takes equal shapes: every message travels padded to the largest one.
    max_received = (k - 1) * (row_bytes + token_bytes * n_max)
    air = k if shared else 1
    # with the whole burst as credit: a lower bound, refined below once the layer's compute is known
    layer_network_s = 8.0 * air * max(0.0, max_received - burst) / bandwidth_bps
    if staged:
        # d2h(msg_p) + h2d(total - msg_p) is linear in msg_p: its maximum is at the smallest or largest message
        small, large = row_bytes + token_bytes * n_min, row_bytes + token_bytes * n_max
        layer_staging_s = stage_lat_s + max(d2h_s_per_byte * small + h2d_s_per_byte * (total_message - small),
                                            d2h_s_per_byte * large + h2d_s_per_byte * (total_message - large))
        sum_staging_s = num_layers * (k * stage_lat_s + d2h_s_per_byte * total_message
                                      + h2d_s_per_byte * (k - 1) * total_message)
    else:
        layer_staging_s = sum_staging_s = 0.0
    if objective is not None:
        bound_s = min_total_s + num_layers * (layer_network_s + layer_staging_s)
        bound_j = min_energy_j + network_w * k * num_layers * layer_network_s + staging_w * sum_staging_s
        if objective_score(objective, bound_s, bound_j) >= beat:
            return None

    if cr == 1:
        segments = [extra + n for n in counts]
    else:
        segments = [extra - (-n // cr) for n in counts]  # vectors each rank's message carries per row
    total_segments = sum(segments)
    max_layer_s = 0.0
    sum_layer_s = 0.0
    seen = 0
    for p in range(k):
        kv = counts[p] + (seen if causal else total_segments - segments[p])
        seen += segments[p]
        layer_s = base[p] + slope[p] * kv
        sum_layer_s += layer_s
        if layer_s > max_layer_s:
            max_layer_s = layer_s

    if burst > 0.0:  # the bucket refills at the link rate while the layer computes
        credit = min(burst, bandwidth_bps / 8.0 * max_layer_s)
        layer_network_s = 8.0 * air * max(0.0, max_received - credit) / bandwidth_bps
    compute_s = num_layers * max_layer_s + overhead_s
    staging_s = num_layers * layer_staging_s
    network_s = num_layers * layer_network_s + setup_network_s
    total_s = compute_s + staging_s + network_s + latency_s
    # Every rank is busy computing, staging or on the link, and idle for the rest of total_s
    # (never negative: each rank's phases are bounded by the critical-path terms).
    sum_compute_s = num_layers * sum_layer_s + overhead_s
    link_s = network_s + latency_s
    energy_j = (compute_w * sum_compute_s + staging_w * sum_staging_s + network_w * k * link_s
                + idle_w * (k * total_s - sum_compute_s - sum_staging_s - k * link_s))
    wire_bytes = num_layers * max_received + setup_wire_bytes
    return compute_s, staging_s, network_s, latency_s, energy_j, wire_bytes


def distributed_terms(profile: Profile, batch: int, speeds: Sequence[float], counts: Sequence[int],
                      codec: CodecFidelity, bandwidth_bps: float, link_latency_s: float,
                      ) -> tuple[float, float, float, float, float, float]:
    """-> (compute_s, staging_s, network_s, latency_s, energy_j, wire_bytes); speeds and counts are per
    rank of the plan, rank 0 (the coordinator) first."""
    constants = profile_constants(profile)
    group = group_terms(constants, batch, speeds, counts, bandwidth_bps, link_latency_s)
    terms = codec_terms(constants, group, batch, codec, bandwidth_bps)
    assert terms is not None  # no objective, no pruning
    return terms


def num_exchanges(profile: Profile) -> int:
    """Collective rounds of a distributed request: the header, the scatter, one exchange per layer and
    the output collection."""
    return profile.model.num_layers + 3


def predict(profile: Profile, request: Request, plan: Plan, link: LinkEstimate) -> Prediction:
    """Predicted latency and energy of running `request` per `plan` (its predicted_* fields are ignored)."""
    if request.model_name != profile.model.name:
        raise ValueError(f"request is for model {request.model_name}, the profile for {profile.model.name}")
    if plan.mode == "local":
        compute_s, energy_j = local_terms(profile, request.batch, request.num_tokens, link.local_compute_scale)
        return Prediction(compute_s, 0.0, 0.0, 0.0, energy_j, profile.energy.source, 0, 0.0)
    if not plan.ranks or plan.ranks[0] != 0 or len(set(plan.ranks)) != len(plan.ranks):
        raise ValueError(f"plan ranks {plan.ranks} must be distinct and start with the coordinator, rank 0")
    if any(not 0 <= r < profile.world_size for r in plan.ranks):
        raise ValueError(f"plan ranks {plan.ranks} are outside the profile's world size {profile.world_size}")
    if len(plan.token_counts) != len(plan.ranks) or sum(plan.token_counts) != request.num_tokens:
        raise ValueError(f"plan token counts {plan.token_counts} do not split {request.num_tokens} tokens "
                         f"over ranks {plan.ranks}")
    speeds = [profile.device_speeds[r] for r in plan.ranks]
    terms = distributed_terms(profile, request.batch, speeds, plan.token_counts, profile.codec(plan.codec),
                              link.bandwidth_bps, link.latency_s)
    compute_s, staging_s, network_s, latency_s, energy_j, wire_bytes = terms
    return Prediction(compute_s, staging_s, network_s, latency_s, energy_j, profile.energy.source,
                      num_exchanges(profile), wire_bytes)


def objective_score(objective: str, latency_s: float, energy_j: float) -> float:
    if objective == "latency":
        return latency_s
    if objective == "energy":
        return energy_j
    return latency_s * energy_j  # edp


__all__ = ["token_shares", "apportion", "local_terms", "distributed_terms", "profile_constants", "group_terms",
           "codec_terms", "num_exchanges", "predict", "objective_score"]
