"""The cost model and the planner with kv-share codecs (compress/kvshare.py): a share of the tokens travels as keys
and values, so receivers project fewer K/V rows at the price of more bytes; only an encoder's overlapped path runs
them. Terms by hand, the pruning bound over random configurations, the planner's choice, the profile's refusal."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from edgeprism.compress import get_codec
from edgeprism.plan import Limits, LinkEstimate, Plan, Request, choose_plan, predict, token_shares
from edgeprism.plan.constants import profile_constants
from edgeprism.plan.cost import codec_terms, group_bound, group_terms, objective_score, rank_compute_s
from edgeprism.plan.planner import enumerate_candidates
from edgeprism.plan.shares import candidate_splits
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.profile import CodecFidelity, ComputeTable
from edgeprism.profile.codec_timing import measure_codec_timing

MODEL = "vit-base-patch16-224"
FIXED_S, PER_KV_S = 0.01, 1e-4


def _entry(name: str, width: int = 768, **changes) -> CodecFidelity:
    return dataclasses.replace(CodecFidelity.from_codec(get_codec(name), width), **changes)


def _plan(counts, codec) -> Plan:
    ranks = tuple(range(len(counts)))
    return Plan("distributed", ranks, token_shares([1.0] * len(ranks)), counts, codec, 1, "", 0.0, 0.0, "",
                "latency", "")


@pytest.mark.parametrize("name", ["kv50:int8", "kv33:fp16", "kv25:int8", "kv70:fp32", "kv100:bf16", "int8"])
def test_the_entry_asks_the_codec_and_weighs_every_message_exactly(name):
    codec, entry = get_codec(name), _entry(name, 64)
    share = getattr(codec, "percent", 0)
    assert entry.kv_share == (share > 0) and entry.kv_tokens(100) == share
    for batch in (1, 3):
        for n in range(1, 150):
            assert entry.kv_tokens(n) == (codec.kv_tokens(n) if share else 0)  # type: ignore[attr-defined]
            assert entry.wire_vectors(n) == n + entry.kv_tokens(n)
            # the cost model's message: rows x (per row + per token x wire_tokens), the codec's bytes to the byte
            predicted = batch * (entry.wire_bytes_per_row + entry.wire_bytes_per_token * entry.wire_tokens(n))
            assert predicted == pytest.approx(codec.nbytes(batch, n, 64), abs=1e-6)


def _profile(*codecs: CodecFidelity):
    """Layer seconds = 0.01 + 1e-4 · B · kv: a received token's K/V projection is all a receiver pays for it."""
    return dataclasses.replace(synthetic_profile(), codecs=codecs,
                               compute=ComputeTable(fixed_s=FIXED_S, per_token_s=0.0, per_kv_s=PER_KV_S,
                                                    per_token_kv_s=0.0))


def test_received_keys_and_values_are_not_projected_and_cost_their_bytes():
    coded = dict(encode_s_per_vector=1e-6, decode_s_per_vector=2e-6)
    profile = _profile(_entry("fp32", **coded), _entry("kv50:fp32", **coded))
    request = Request(MODEL, 1, 200)
    link = LinkEstimate(bandwidth_bps=8e6, latency_s=0.002)  # 1 MB/s: the wire dominates
    plain = predict(profile, request, _plan((100, 100), "fp32"), link)
    kv = predict(profile, request, _plan((100, 100), "kv50:fp32"), link)
    # 50 of the other rank's 100 tokens arrive as keys and values: 50 projections fewer; encode and decode per
    # wire vector: 150 sent and 150 received instead of 100
    plain_layer = FIXED_S + 200 * PER_KV_S + 100 * 3e-6
    kv_layer = FIXED_S + 150 * PER_KV_S + 150 * 3e-6
    assert plain.compute_s == pytest.approx(12 * plain_layer) and kv.compute_s == pytest.approx(12 * kv_layer)
    assert rank_compute_s(profile, 1, (100, 100), profile.codec("kv50:fp32")) == pytest.approx([12 * kv_layer] * 2)
    scatter = 100 * profile.input_bytes_per_token
    assert kv.wire_bytes - scatter == pytest.approx(1.5 * (plain.wire_bytes - scatter))
    assert kv.network_s > plain.network_s
    # overlapped: the own-key work beside the exchange loses the own K/V projections (they run before the send)
    hidden_plain = predict(profile, request, _plan((100, 100), "fp32"), dataclasses.replace(link, overlap=True))
    hidden_kv = predict(profile, request, _plan((100, 100), "kv50:fp32"), dataclasses.replace(link, overlap=True))
    assert plain.total_s - hidden_plain.total_s == pytest.approx(12 * 1.5 * 100 * PER_KV_S)
    assert kv.total_s - hidden_kv.total_s == pytest.approx(12 * 0.5 * 100 * PER_KV_S)


_POOL = ("fp32", "fp16", "int8", "sm4", "sm4a+int8", "kv25:fp16", "kv50:int8", "kv100:fp32", "kv7:int8")


def test_the_pruning_bounds_stay_below_every_codecs_prediction():
    """Property: over random groups, splits, links, compute tables and runtime modes, the planner's lower bounds
    (`group_bound`, `GroupTerms.min_total_s` / `min_energy_j`, `codec_terms`' early exit) never exceed what any
    codec predicts, kv shares included; otherwise the planner would prune a plan that wins."""
    rng = random.Random(7)
    base = synthetic_profile(world_size=5)
    checked = kv_cheaper = 0
    for _ in range(250):
        compute = ComputeTable(fixed_s=rng.choice([0.0, 1e-4, 1e-2]), per_token_s=rng.uniform(0, 1e-4),
                               per_kv_s=rng.uniform(0, 3e-4), per_token_kv_s=rng.choice([0.0, rng.uniform(0, 1e-6)]),
                               request_overhead_s=rng.uniform(0, 1e-2))
        codecs = tuple(_entry(name, encode_s_per_vector=rng.choice([0.0, rng.uniform(0, 2e-6)]),
                              decode_s_per_vector=rng.choice([0.0, rng.uniform(0, 2e-6)]))
                       for name in rng.sample(_POOL, rng.randint(1, len(_POOL))))
        profile = dataclasses.replace(base, compute=compute, codecs=codecs)
        overlap = rng.random() < 0.7
        constants = profile_constants(profile, sealed=False, overlap=overlap, micro_batches=rng.choice([1, 1, 2, 4]))
        constants = constants._replace(burst_bytes=rng.choice([0.0, 1e5]), staged=rng.random() < 0.3,
                                       shared_medium=rng.random() < 0.3, d2h_s_per_byte=1e-9, h2d_s_per_byte=1e-9,
                                       stage_latency_s=1e-5)
        k = rng.randint(2, 5)
        speeds = [rng.uniform(0.3, 2.0) for _ in range(k)]
        num_tokens = rng.randint(k, 400)
        cuts = sorted(rng.sample(range(1, num_tokens), k - 1))
        counts = tuple(b - a for a, b in zip((0, *cuts), (*cuts, num_tokens)))
        batch, bandwidth, latency = rng.choice([1, 3, 16]), rng.choice([1e6, 5e7, 1e9, 1e11]), rng.uniform(0, 5e-3)
        group = group_terms(constants, batch, speeds, counts, bandwidth, latency, codecs)
        bound_s, bound_j = group_bound(constants, batch, num_tokens, speeds, latency)
        totals = {}
        for codec in codecs:
            terms = codec_terms(constants, group, batch, codec, bandwidth)
            assert terms is not None
            total_s = terms.compute_s + terms.staging_s + terms.network_s + terms.latency_s
            totals[codec.codec] = total_s
            slack = 1e-9 * max(1.0, total_s, terms.energy_j)
            assert group.min_total_s <= total_s + slack and bound_s <= total_s + slack, (codec.codec, counts)
            assert group.min_energy_j <= terms.energy_j + slack and bound_j <= terms.energy_j + slack, codec.codec
            for objective in ("latency", "energy"):  # the early exit keeps anything that scores at most `beat`
                beat = (total_s if objective == "latency" else terms.energy_j) * (1 + 1e-9) + 1e-12
                assert codec_terms(constants, group, batch, codec, bandwidth, objective, beat) is not None
            checked += 1
        kv_cheaper += any(name.startswith("kv") and total < min(totals.values()) + 1e-12 for name, total in
                          totals.items()) and len(totals) > 1
    assert checked > 500 and kv_cheaper > 0  # the kv shares were weighed, and some won


def _four_rank_encoder():
    codecs = tuple(_entry(name) for name in ("fp16", "kv25:fp16", "kv50:fp16", "kv100:fp16"))  # all lossless
    return dataclasses.replace(synthetic_profile(world_size=4), codecs=codecs)


def test_a_compute_bound_four_rank_encoder_with_wire_slack_sends_keys_and_values():
    profile, request = _four_rank_encoder(), Request(MODEL, 8, 197)
    fast = LinkEstimate(bandwidth_bps=1e9, latency_s=1e-3, overlap=True)
    plan = choose_plan(profile, request, fast)
    assert plan.codec.startswith("kv") and len(plan.ranks) == 4, plan
    by_codec = {c.plan.codec: c for c in enumerate_candidates(profile, request, fast) if len(c.plan.ranks) == 4}
    assert by_codec[plan.codec].prediction.total_s < by_codec["fp16"].prediction.total_s
    # on a wire-bound link the extra bytes cost more than the projections they spare: hidden states travel
    slow = dataclasses.replace(fast, bandwidth_bps=2e8)
    assert choose_plan(profile, request, slow).codec == "fp16"


def test_kv_shares_are_never_chosen_where_the_runtime_cannot_run_them():
    encoder = _four_rank_encoder()
    request = Request(MODEL, 8, 197)
    not_overlapped = LinkEstimate(bandwidth_bps=1e9, latency_s=1e-3, overlap=False, micro_batches=2)
    plan = choose_plan(encoder, request, not_overlapped)
    assert plan.codec == "fp16" and "kv-share codec(s)" in plan.reason
    excluded = {c.plan.codec: c.excluded for c in enumerate_candidates(encoder, request, not_overlapped)}
    assert "overlapped path" in excluded["kv100:fp16"] and excluded["fp16"] is None
    decoder = synthetic_profile("gpt2-124m", world_size=4)
    decoder = dataclasses.replace(decoder, codecs=tuple(_entry(n, decoder.model.exchange_width)
                                                        for n in ("fp16", "kv50:fp16", "kv100:fp16")))
    for batch, tokens in ((1, 512), (8, 256)):
        request = Request("gpt2-124m", batch, tokens)
        for link in (LinkEstimate(1e9, 1e-3, overlap=True), LinkEstimate(1e11, 1e-4, overlap=True)):
            assert not choose_plan(decoder, request, link).codec.startswith("kv")
            assert all(c.excluded for c in enumerate_candidates(decoder, request, link) if c.plan.codec[:2] == "kv")


def test_a_kv_share_is_timed_per_wire_vector():
    timing = measure_codec_timing(get_codec("kv50:int8"), 64, target_vectors=256, repeats=1, num_tokens=64)
    assert timing.encode_s_per_vector > 0 and timing.decode_s_per_vector > 0 and timing.vectors_per_pass == 256


def test_the_balanced_split_of_a_kv_share_levels_its_own_layer_times():
    # receivers of a kv share pay less per received token: balanced for it, the split differs from the
    # hidden-state codec's, and the slowest rank's predicted layer comes down
    profile, speeds = _four_rank_encoder(), (1.0, 0.5, 2.0, 0.9)
    constants = profile_constants(profile, overlap=True)
    kv, fp16 = profile.codec("kv100:fp16"), profile.codec("fp16")

    def slowest_s(counts):
        return max(t / s for t, s in zip(rank_compute_s(profile, 4, counts, kv), speeds))

    own = candidate_splits(constants, 4, speeds, 197, kv, blends=False)[0]
    borrowed = candidate_splits(constants, 4, speeds, 197, fp16, blends=False)[0]
    assert own != borrowed and slowest_s(own) < slowest_s(borrowed)


def test_pruning_never_loses_a_kv_share_that_wins():
    # bounds, dominance and blends only skip what cannot win, kv shares among the codecs: brute force agrees
    base = synthetic_profile(MODEL, world_size=6, device_speeds=(1.0, 0.5, 2.0, 0.9, 1.1, 0.7))
    shares = tuple(_entry(name, loss=loss, metric="m", value=1 - loss, reference_value=1.0)
                   for name, loss in (("kv50:int8", 0.01), ("kv100:fp16", 0.0), ("kv25:fp32", 0.0)))
    profile = dataclasses.replace(base, codecs=base.codecs + shares)
    limits = Limits(max_fidelity_loss=None, allow_unmeasured_codecs=True)
    chosen = []
    for objective, batch, bandwidth, micro_batches in itertools.product(
            ("latency", "energy", "edp"), (8, 32), (1e9, 1e11), (1, 2)):
        request = Request(MODEL, batch, 197)
        link = LinkEstimate(bandwidth, 1e-3, overlap=True, micro_batches=micro_batches)
        plan = choose_plan(profile, request, link, objective, limits)
        allowed = [c for c in enumerate_candidates(profile, request, link, objective, limits) if c.excluded is None]
        best = min(objective_score(objective, c.prediction.total_s, c.prediction.energy_j) for c in allowed)
        assert objective_score(objective, plan.predicted_latency_s, plan.predicted_energy_j) == pytest.approx(best)
        chosen.append(plan.codec)
    assert any(codec.startswith("kv") for codec in chosen), chosen
