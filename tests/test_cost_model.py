"""The cost model: its terms on hand-checkable cases, and how they move with codec, staging and medium."""

from __future__ import annotations

import dataclasses

import pytest

from edgeprism.plan import LinkEstimate, Plan, Request, apportion, choose_plan, predict, token_shares
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.profile import CodecFidelity, ComputeTable, LinkMeasurement

MODEL = "vit-base-patch16-224"


def _plan(ranks, counts, codec) -> Plan:
    return Plan(
        "distributed", ranks, token_shares([1.0] * len(ranks)), counts, codec, 1, "", 0.0, 0.0, "", "latency", ""
    )


def _link(profile) -> LinkEstimate:
    return LinkEstimate(profile.link.bandwidth_bps, profile.link.latency_s)


def test_local_prediction_is_layers_times_layer_time():
    profile = synthetic_profile()
    c = profile.compute
    pred = predict(
        profile,
        Request(MODEL, 2, 197),
        Plan("local", (0,), (1.0,), (197,), "", 1, "", 0, 0, "", "latency", ""),
        _link(profile),
    )
    expected = 12 * c.layer_seconds(2, 197, 197) + c.request_overhead_s
    assert pred.total_s == pytest.approx(expected) == pytest.approx(pred.compute_s)
    assert pred.energy_j == pytest.approx(profile.energy.compute_w * expected)
    assert (pred.network_s, pred.latency_s, pred.exchanges, pred.energy_source) == (0.0, 0.0, 0, "modelled")


def test_synthetic_vit_b16_is_about_a_third_of_a_second_per_image():
    profile = synthetic_profile()
    pred = predict(
        profile,
        Request(MODEL, 1, 197),
        Plan("local", (0,), (1.0,), (197,), "", 1, "", 0, 0, "", "latency", ""),
        _link(profile),
    )
    assert 0.33 < pred.total_s < 0.38


def test_distributed_terms_by_hand():
    # Uniform codec: fp32 with 1 count byte, no anchors; 2 equal ranks; a compute model with only a fixed term.
    fp32 = CodecFidelity("fp32", 1, "fp32", 3073.0, loss=0.0)
    profile = dataclasses.replace(synthetic_profile(), codecs=(fp32,),
                                  compute=ComputeTable(fixed_s=0.01, per_token_s=0.0, per_kv_s=0.0, per_token_kv_s=0.0))
    link = LinkEstimate(bandwidth_bps=8e6, latency_s=0.002)  # 1 MB/s
    pred = predict(profile, Request(MODEL, 1, 200), _plan((0, 1), (100, 100), "fp32"), link)
    assert pred.compute_s == pytest.approx(12 * 0.01)
    assert pred.staging_s == 0.0
    # per layer each rank receives the other's 100 tokens; the scatter sends rank 1 its 100 tokens' pixels
    scatter = 100 * profile.input_bytes_per_token
    assert pred.network_s == pytest.approx((12 * 100 * 3073 + scatter) / 1e6)
    # header + one scatter message + 12 layer all-gathers (1 hop each) + the output reduce
    assert pred.latency_s == pytest.approx((1 + 1 + 12 * 1 + 1) * 0.002)
    assert pred.wire_bytes == pytest.approx(12 * 100 * 3073 + scatter)
    assert pred.exchanges == 15
    assert pred.total_s == pytest.approx(pred.compute_s + pred.staging_s + pred.network_s + pred.latency_s)
    e = profile.energy
    link_s = pred.network_s + pred.latency_s
    per_rank_compute = [12 * 0.01, 12 * 0.01]
    expected = sum(e.compute_w * c + e.network_w * link_s + e.idle_w * (pred.total_s - c - link_s)
                   for c in per_rank_compute)
    assert pred.energy_j == pytest.approx(expected)


def test_compression_cuts_network_and_kv_compute():
    profile = synthetic_profile()
    request, link = Request(MODEL, 4, 197), _link(profile)
    full = predict(profile, request, _plan((0, 1), (99, 98), "fp32"), link)
    sm4 = predict(profile, request, _plan((0, 1), (99, 98), "sm4"), link)
    sm16 = predict(profile, request, _plan((0, 1), (99, 98), "sm16+int8"), link)
    assert full.network_s > sm4.network_s > sm16.network_s
    assert full.compute_s > sm4.compute_s > sm16.compute_s  # fewer remote key/value vectors
    assert full.latency_s == sm16.latency_s  # the same number of exchanges


def test_staging_and_shared_medium_cost_more():
    request = Request(MODEL, 2, 197)
    plain = synthetic_profile()
    staged = synthetic_profile(staging=True)
    shared = synthetic_profile(world_size=3, medium="shared")
    switched = synthetic_profile(world_size=3)
    p2 = _plan((0, 1), (99, 98), "fp16")
    assert predict(plain, request, p2, _link(plain)).staging_s == 0.0
    assert predict(staged, request, p2, _link(staged)).staging_s > 0.0
    p3 = _plan((0, 1, 2), (66, 66, 65), "fp16")
    assert (
        predict(shared, request, p3, _link(shared)).network_s
        > predict(switched, request, p3, _link(switched)).network_s
    )


def test_decoder_ranks_attend_only_to_earlier_means():
    gpt = synthetic_profile("gpt2-124m")
    bert = dataclasses.replace(synthetic_profile("bert-base"), input_bytes_per_token=gpt.input_bytes_per_token,
                               output_bytes_per_row=gpt.output_bytes_per_row)
    plan = _plan((0, 1), (128, 128), "fp32")
    causal = predict(gpt, Request("gpt2-124m", 1, 256), plan, _link(gpt))
    full = predict(bert, Request("bert-base", 1, 256), plan, _link(bert))
    # Same sizes (768 wide, 12 layers, MLP 3072). Rank 1 attends to rank 0's tokens either way, so the slowest
    # rank is the same; under the causal mask rank 0 attends to no remote vectors, so less work in total.
    assert causal.compute_s == pytest.approx(full.compute_s)
    assert causal.network_s == pytest.approx(full.network_s)
    assert causal.energy_j < full.energy_j


def test_apportion_is_proportional_whole_and_at_least_one():
    assert apportion(197, [1.0, 1.0]) == (99, 98)
    assert apportion(100, [1.0, 3.0]) == (25, 75)
    assert apportion(3, [1.0, 100.0, 100.0]) == (1, 1, 1)
    assert apportion(10, [0.01, 1.0]) == (1, 9)
    for n in range(4, 60):
        counts = apportion(n, [1.0, 0.5, 0.8, 0.3])
        assert sum(counts) == n and min(counts) >= 1
    with pytest.raises(ValueError, match="3 tokens cannot give 4 ranks"):
        apportion(3, [1.0] * 4)


def test_predict_checks_the_plan():
    profile = synthetic_profile(world_size=2)
    request, link = Request(MODEL, 1, 197), _link(profile)
    with pytest.raises(ValueError, match="start with the coordinator"):
        predict(profile, request, _plan((1, 0), (99, 98), "fp32"), link)
    with pytest.raises(ValueError, match="outside the profile's world size 2"):
        predict(profile, request, _plan((0, 2), (99, 98), "fp32"), link)
    with pytest.raises(ValueError, match="do not split 197 tokens"):
        predict(profile, request, _plan((0, 1), (99, 99), "fp32"), link)
    with pytest.raises(ValueError, match="codec 'zip' is not in the profile"):
        predict(profile, request, _plan((0, 1), (99, 98), "zip"), link)
    with pytest.raises(ValueError, match="request is for model bert-base"):
        predict(profile, Request("bert-base", 1, 8), _plan((0, 1), (4, 4), "fp32"), link)


def test_explain_names_every_term():
    profile = synthetic_profile()
    plan = choose_plan(profile, Request(MODEL, 8, 197), _link(profile))
    pred = predict(profile, Request(MODEL, 8, 197), plan, _link(profile))
    text = pred.explain()
    for word in ("compute", "staging", "network", "latency", "exchanges", "J modelled"):
        assert word in text
    assert pred.to_dict()["total_s"] == pred.total_s
    assert LinkMeasurement(0.003, 5e7).medium == "switched"


def test_wire_bytes_agree_with_the_exact_accounting():
    compress = pytest.importorskip("edgeprism.compress")
    accounting = pytest.importorskip("edgeprism.plan.accounting")
    entry = CodecFidelity.from_codec(compress.get_codec("sm4a+int8"), 768)
    profile = dataclasses.replace(synthetic_profile(world_size=3), codecs=(entry,), input_bytes_per_token=0.0)
    counts = (100, 96, 64)  # multiples of the ratio: the per-token rate is exact there
    plan = Plan("distributed", (0, 1, 2), token_shares([1.0] * 3), counts, entry.codec, entry.cr, "", 0, 0, "",
                "latency", "")
    pred = predict(profile, Request(MODEL, 2, sum(counts)), plan, _link(profile))
    exact = accounting.exchange_cost(profile.model, counts, "sm4a+int8", batch=2)
    assert pred.wire_bytes == pytest.approx(12 * 2 * max(exact.message_bytes_per_rank))
    assert pred.wire_bytes == pytest.approx(12 * exact.padded_allgather_bytes_per_layer * 2 / 3)


def test_token_bucket_credit_lets_small_messages_through_free():
    # fp32, 2 equal ranks of 100 tokens: each receives 100 x 3073 B = 307 300 B per layer.
    fp32 = CodecFidelity("fp32", 1, "fp32", 3073.0, loss=0.0)
    base = dataclasses.replace(synthetic_profile(), codecs=(fp32,),
                               compute=ComputeTable(fixed_s=0.01, per_token_s=0.0, per_kv_s=0.0, per_token_kv_s=0.0))
    link = LinkEstimate(bandwidth_bps=8e6, latency_s=0.002)  # 1 MB/s: a 10 ms layer refills 10 000 B
    request, plan = Request(MODEL, 1, 200), _plan((0, 1), (100, 100), "fp32")
    scatter = 100 * base.input_bytes_per_token

    def network_s(burst):
        profile = dataclasses.replace(base, link=dataclasses.replace(base.link, burst_bytes=burst))
        return predict(profile, request, plan, link).network_s

    assert network_s(0.0) == pytest.approx((12 * 100 * 3073 + scatter) / 1e6)
    # a 5 000 B bucket refills within the layer: every message and the scatter get 5 000 B free
    assert network_s(5000.0) == pytest.approx((12 * (100 * 3073 - 5000) + scatter - 5000) / 1e6)
    # a 50 000 B bucket refills only 10 000 B per 10 ms layer; the scatter (after idle) gets all of it
    assert network_s(50_000.0) == pytest.approx((12 * (100 * 3073 - 10_000) + scatter - 50_000) / 1e6)
    # a message within the credit costs no transfer time at all
    small = dataclasses.replace(base, link=dataclasses.replace(base.link, burst_bytes=1e9))
    assert predict(small, Request(MODEL, 1, 4), _plan((0, 1), (2, 2), "fp32"),
                   LinkEstimate(bandwidth_bps=8e12, latency_s=0.002)).network_s == 0.0


def test_negative_burst_is_refused():
    with pytest.raises(ValueError, match="burst_bytes"):
        LinkMeasurement(latency_s=0.001, bandwidth_bps=1e6, burst_bytes=-1.0)
