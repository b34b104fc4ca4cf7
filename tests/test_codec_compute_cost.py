"""A codec's own compute (issue 16): measured per vector in the profile (profile/codec_timing.py) and charged by
the cost model as compute at each rank's speed (plan/cost.py). Hand-checked terms on synthetic profiles, the
planner's choice where the arithmetic decides it, the schema with and without the fields, and a real
measurement on a tiny width (sign only, no timing assertions)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edgeprism.compress.registry import get_codec
from edgeprism.plan import LinkEstimate, Plan, Request, choose_plan, predict, token_shares
from edgeprism.plan.cost import rank_compute_s
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.profile import CodecFidelity, ComputeTable, Profile
from edgeprism.profile.codec_timing import measure_codec_timing, refresh_codec_timings

VIT = "vit-base-patch16-224"
FIXED_S = 0.01
FP16 = CodecFidelity("fp16", 1, "fp16", 1537.0, loss=0.0)
INT8 = CodecFidelity("int8", 1, "int8", 771.0, loss=0.0)


def _plan(counts, codec) -> Plan:
    ranks = tuple(range(len(counts)))
    return Plan("distributed", ranks, token_shares([1.0] * len(ranks)), counts, codec, 1, "", 0.0, 0.0, "",
                "latency", "")


def _timed(entry: CodecFidelity, encode_s: float, decode_s: float) -> CodecFidelity:
    return dataclasses.replace(entry, encode_s_per_vector=encode_s, decode_s_per_vector=decode_s)


def _fixed_profile(model: str = VIT, codecs=(FP16,), speeds=(1.0, 1.0), per_token_s: float = 0.0) -> Profile:
    """Layer compute is a fixed 10 ms (+ `per_token_s` per own token): the rest of the compute term is the codec's."""
    return dataclasses.replace(synthetic_profile(model, device_speeds=speeds), codecs=tuple(codecs),
                               compute=ComputeTable(fixed_s=FIXED_S, per_token_s=per_token_s, per_kv_s=0.0,
                                                    per_token_kv_s=0.0))


def _link(profile, **kw) -> LinkEstimate:
    return LinkEstimate(profile.link.bandwidth_bps, profile.link.latency_s, **kw)


def test_encoder_ranks_pay_encode_of_their_message_and_decode_of_the_others_at_their_speed():
    entry = _timed(FP16, 1e-4, 3e-4)
    profile = _fixed_profile(codecs=(entry,), speeds=(1.0, 0.5))
    pred = predict(profile, Request(VIT, 2, 150), _plan((100, 50), "fp16"), _link(profile))
    rank0 = FIXED_S + 2 * (1e-4 * 100 + 3e-4 * 50)  # encodes 100 vectors a row, decodes rank 1's 50
    rank1 = (FIXED_S + 2 * (1e-4 * 50 + 3e-4 * 100)) / 0.5
    assert pred.compute_s == pytest.approx(12 * max(rank0, rank1) + profile.compute.request_overhead_s)
    assert rank_compute_s(profile, 2, (100, 50), entry) == pytest.approx(
        [12 * rank0 + profile.compute.request_overhead_s, 12 * rank1 * 0.5])


def test_decoder_ranks_decode_only_the_earlier_ranks():
    entry = _timed(FP16, 1e-4, 3e-4)
    profile = _fixed_profile("gpt2-124m", codecs=(entry,))
    counts = (100, 100)
    units = rank_compute_s(profile, 1, counts, entry)
    overhead = profile.compute.request_overhead_s
    # every rank encodes its message (the last one too, as the runtime does); rank 0 reads nobody
    assert units == pytest.approx([12 * (FIXED_S + 1e-4 * 100) + overhead, 12 * (FIXED_S + 1e-4 * 100 + 3e-4 * 100)])
    pred = predict(profile, Request("gpt2-124m", 1, 200), _plan(counts, "fp16"), _link(profile))
    assert pred.compute_s == pytest.approx(units[1] + overhead)


def test_zero_seconds_cost_exactly_what_an_entry_without_them_costs():
    profile = synthetic_profile()
    request, plan = Request(VIT, 4, 197), _plan((99, 98), "int8")
    bare = predict(profile, request, plan, _link(profile))
    entry = profile.codec("int8")
    assert (entry.encode_s_per_vector, entry.decode_s_per_vector) == (0.0, 0.0)
    zeroed = dataclasses.replace(profile, codecs=tuple(_timed(c, 0.0, 0.0) for c in profile.codecs))
    assert predict(zeroed, request, plan, _link(profile)) == bare
    timed = dataclasses.replace(profile, codecs=tuple(_timed(c, 1e-6, 1e-6) for c in profile.codecs))
    assert predict(timed, request, plan, _link(profile)).compute_s > bare.compute_s


def test_overlap_and_micro_batches_charge_it_too():
    profile = _fixed_profile(codecs=(FP16,))
    timed = _fixed_profile(codecs=(_timed(FP16, 2e-4, 2e-4),))
    request, plan = Request(VIT, 4, 200), _plan((100, 100), "fp16")
    link = _link(profile, overlap=True, micro_batches=2)
    extra = predict(timed, request, plan, link).compute_s - predict(profile, request, plan, link).compute_s
    assert extra == pytest.approx(12 * 4 * (2e-4 * 100 + 2e-4 * 100))  # equal ranks: each layer's slowest


@pytest.mark.parametrize("factor, winner", [(2.0, "fp16"), (0.5, "int8")])
def test_a_costly_codec_of_fewer_bytes_loses_where_its_compute_outweighs_the_wire_it_saves(factor, winner):
    profile = _fixed_profile(codecs=(FP16, INT8), per_token_s=1e-3)  # splitting pays: local 0.21 s a layer
    request, counts = Request(VIT, 1, 200), (100, 100)
    saved_s = (predict(profile, request, _plan(counts, "fp16"), _link(profile)).total_s
               - predict(profile, request, _plan(counts, "int8"), _link(profile)).total_s)
    assert saved_s > 0 and choose_plan(profile, request, _link(profile)).codec == "int8"
    # per layer each rank encodes 100 and decodes 100 vectors, s seconds each: 12 · 200 · s = factor × what int8 saves
    per_vector_s = factor * saved_s / (12 * 200)
    costly = _fixed_profile(codecs=(FP16, _timed(INT8, per_vector_s, per_vector_s)), per_token_s=1e-3)
    assert choose_plan(costly, request, _link(costly)).codec == winner


def test_schema_round_trips_with_the_fields_and_reads_files_without_them(tmp_path):
    profile = synthetic_profile()
    data = json.loads(profile.to_json())
    assert all("encode_s_per_vector" not in c and "decode_s_per_vector" not in c for c in data["codecs"])
    timed = dataclasses.replace(profile, codecs=(_timed(profile.codecs[0], 2e-7, 1e-7), *profile.codecs[1:]))
    path = tmp_path / "p.json"
    timed.save(path)
    loaded = Profile.load(path)
    assert loaded == timed and loaded.codecs[0].decode_s_per_vector == 1e-7
    assert json.loads(path.read_text())["codecs"][0]["encode_s_per_vector"] == 2e-7
    assert timed.profile_hash() != profile.profile_hash()
    with pytest.raises(ValueError, match="encode_s_per_vector"):
        _timed(FP16, -1.0, 0.0)


def test_measured_for_real_codecs_and_a_stateful_one():
    for name in ("int8", "lb4o4r", "delta:int8:int4"):
        timing = measure_codec_timing(get_codec(name), 32, num_layers=3, num_tokens=16, target_vectors=64,
                                      warmup=0, repeats=1)
        assert timing.codec == name and timing.encode_s_per_vector > 0 and timing.decode_s_per_vector > 0
    with pytest.raises(ValueError, match="width 0"):
        measure_codec_timing(get_codec("int8"), 0)


def test_refresh_measures_only_the_codec_timings():
    profile = synthetic_profile("bert-tiny-test")
    refreshed = refresh_codec_timings(profile, ["int8"], num_tokens=16, target_vectors=64, warmup=0, repeats=1)
    assert refreshed.codec("int8").encode_s_per_vector > 0 and refreshed.codec("fp16").encode_s_per_vector == 0
    assert dataclasses.replace(refreshed, codecs=profile.codecs, notes=profile.notes) == profile
    with pytest.raises(ValueError, match="sm3"):
        refresh_codec_timings(profile, ["sm3"])
