"""The cost model with the exchange hidden behind compute (plan/pipeline.py): own-key attention overlapped with
each layer's all-gather, and micro-batches. Hand-checked terms on synthetic profiles (the planner is pure)."""

from __future__ import annotations

import dataclasses

import pytest

from edgeprism.plan import LinkEstimate, Plan, Request, choose_plan, predict, token_shares
from edgeprism.plan.pipeline import pipelined_layer_s
from edgeprism.plan.planner import enumerate_candidates
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.plan.types import Limits
from edgeprism.profile import CodecFidelity, ComputeTable

MODEL = "vit-base-patch16-224"
FP32 = CodecFidelity("fp32", 1, "fp32", 3073.0, loss=0.0)
FIXED_S, PER_KV_S = 0.01, 1e-4


def _plan(counts, codec="fp32") -> Plan:
    ranks = tuple(range(len(counts)))
    return Plan("distributed", ranks, token_shares([1.0] * len(ranks)), counts, codec, 1, "", 0.0, 0.0, "",
                "latency", "")


def _profile():
    """Layer seconds = 0.01 + 1e-4 · B · kv: 100 own + 100 received tokens: 0.03 s; own-key work 1.5e-4 · B · n_own."""
    return dataclasses.replace(synthetic_profile(), codecs=(FP32,),
                               compute=ComputeTable(fixed_s=FIXED_S, per_token_s=0.0, per_kv_s=PER_KV_S,
                                                    per_token_kv_s=0.0))


def test_one_layer_by_the_formula():
    assert pipelined_layer_s(0.03, 0.0, 0.3, 1) == pytest.approx(0.33)  # sequential: compute, then exchange
    assert pipelined_layer_s(0.03, 0.01, 0.3, 1) == pytest.approx(0.32)  # own-key work hides 0.01 s of it
    assert pipelined_layer_s(0.03, 0.01, 0.005, 1) == pytest.approx(0.03)  # a short exchange hides entirely
    assert pipelined_layer_s(0.04, 0.0, 0.15, 2) == pytest.approx(0.3)  # the link carries two slices in turn
    assert pipelined_layer_s(0.4, 0.1, 0.05, 2) == pytest.approx(0.4)  # compute-bound: all hidden
    assert pipelined_layer_s(0.2, 0.04, 0.1, 2) == pytest.approx(0.08 + 0.1 + 0.02)  # a slice waits on its own


def test_overlap_hides_the_own_key_work_behind_a_long_exchange():
    profile, request = _profile(), Request(MODEL, 1, 200)
    link = LinkEstimate(bandwidth_bps=8e6, latency_s=0.002)  # 1 MB/s: 0.3073 s per layer on the wire
    plain = predict(profile, request, _plan((100, 100)), link)
    overlapped = predict(profile, request, _plan((100, 100)), dataclasses.replace(link, overlap=True))
    own_s = 1.5 * 100 * PER_KV_S  # own K/V projections and the Q projection (half of theirs)
    assert overlapped.compute_s == pytest.approx(plain.compute_s) == pytest.approx(12 * (FIXED_S + 200 * PER_KV_S))
    assert overlapped.network_s == pytest.approx(plain.network_s - 12 * own_s)
    assert overlapped.latency_s == pytest.approx(plain.latency_s)
    assert overlapped.total_s == pytest.approx(plain.total_s - 12 * own_s)
    assert overlapped.wire_bytes == plain.wire_bytes
    assert overlapped.energy_j == pytest.approx(plain.energy_j)  # the same busy phases (here no idle time either)


def test_a_short_exchange_hides_entirely_wire_and_hops():
    profile, request = _profile(), Request(MODEL, 1, 200)
    link = LinkEstimate(bandwidth_bps=8e9, latency_s=0.002, overlap=True)  # 0.3 ms on the wire per layer
    plain = predict(profile, request, _plan((100, 100)), dataclasses.replace(link, overlap=False))
    overlapped = predict(profile, request, _plan((100, 100)), link)
    layer_wire_s = 100 * 3073 * 8 / 8e9
    assert layer_wire_s + 0.002 < 1.5 * 100 * PER_KV_S  # the own-key work is longer than the exchange
    assert overlapped.network_s == pytest.approx(plain.network_s - 12 * layer_wire_s)
    assert overlapped.latency_s == pytest.approx(plain.latency_s - 12 * 0.002)  # only the per-request rounds left
    assert overlapped.total_s == pytest.approx(plain.total_s - 12 * (layer_wire_s + 0.002))


def test_two_micro_batches_by_hand():
    profile, request = _profile(), Request(MODEL, 4, 200)
    link = LinkEstimate(bandwidth_bps=8e6, latency_s=0.002, overlap=True)
    one = predict(profile, request, _plan((100, 100)), link)
    two = predict(profile, request, _plan((100, 100)), dataclasses.replace(link, micro_batches=2))
    compute_s = FIXED_S + 4 * 200 * PER_KV_S  # one layer of the whole batch
    wire_s = 4 * 100 * 3073 / 1e6  # one layer's bytes at 1 MB/s
    assert two.compute_s == pytest.approx(one.compute_s + 12 * FIXED_S)  # a second fixed cost per layer
    layer_s = pipelined_layer_s(compute_s + FIXED_S, 1.5 * 4 * 100 * PER_KV_S, wire_s / 2 + 0.002, 2)
    assert layer_s == pytest.approx(wire_s + 2 * 0.002)  # link-bound: two slices in turn
    setup_s = one.total_s - 12 * pipelined_layer_s(compute_s, 1.5 * 4 * 100 * PER_KV_S, wire_s + 0.002, 1)
    assert two.total_s == pytest.approx(setup_s + 12 * layer_s)
    assert two.total_s < one.total_s


def test_micro_batches_change_nothing_for_one_row_or_a_decoder():
    profile = _profile()
    link = LinkEstimate(bandwidth_bps=8e6, latency_s=0.002, overlap=True)
    one_row = Request(MODEL, 1, 200)
    assert predict(profile, one_row, _plan((100, 100)), dataclasses.replace(link, micro_batches=2)) == \
        predict(profile, one_row, _plan((100, 100)), link)
    gpt = synthetic_profile("gpt2-124m")
    request, plan = Request("gpt2-124m", 4, 256), _plan((128, 128), "fp16")
    sequential = predict(gpt, request, plan, LinkEstimate(50e6, 3e-3))
    assert predict(gpt, request, plan, LinkEstimate(50e6, 3e-3, overlap=True, micro_batches=2)) == sequential


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_the_planner_still_finds_the_best_candidate(batch, micro_batches):
    """The planner prunes by lower bounds; with the exchange hidden they must stay below every real total."""
    profile = synthetic_profile(world_size=3, device_speeds=(1.0, 0.8, 0.5), bandwidth_bps=20e6)
    link = LinkEstimate(20e6, 3e-3, overlap=True, micro_batches=micro_batches)
    limits = Limits(max_fidelity_loss=None, allow_unmeasured_codecs=True)
    request = Request(MODEL, batch, 197)
    chosen = choose_plan(profile, request, link, limits=limits)
    best = min(c.prediction.total_s for c in enumerate_candidates(profile, request, link, limits=limits)
               if c.prediction is not None and c.excluded is None)
    assert chosen.predicted_latency_s == pytest.approx(best)


def test_micro_batches_must_be_positive():
    with pytest.raises(ValueError, match="micro_batches must be >= 1, got 0"):
        LinkEstimate(50e6, 3e-3, micro_batches=0)
