"""The offline profiler's parts: grid, fits, compute timing, staging, energy, fidelity, link, validation.

Tiny models only, no timing assertions: the numbers are checked for shape, sign and bookkeeping.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from edgeprism.compress.registry import get_codec
from edgeprism.energy.fake import FakeMeter
from edgeprism.energy.model import get_power_model
from edgeprism.jobs.validate import (
    ValidationPoint,
    compare,
    held_out_codecs,
    held_out_token_counts,
    plan_for,
    validation_points,
)
from edgeprism.models.loading import build_model
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.profile.compute import compute_grid, fit_overhead, fit_relative, measure_compute, pinned, sparse_batches
from edgeprism.profile.energy import measure_energy, one_block
from edgeprism.profile.fidelity import codec_entries, evaluate_fidelity, load_fidelity_rows, select_rows
from edgeprism.profile.link import link_section
from edgeprism.profile.profiler import (
    ProfileOptions,
    held_out_batches,
    input_bytes_per_token,
    run_profile,
    validate_options,
)
from edgeprism.profile.schema import ComputeSample, ComputeTable, LinkMeasurement, Profile
from edgeprism.profile.staging import fit_copy, measure_staging

RAW_LINK = {"latency_s": 0.004, "bandwidth_bps": 6.0e7, "allgather_bandwidth_bps": 3.0e7, "world_size": 2,
            "hops": 1, "latency_nbytes": 64, "bandwidth_nbytes": 1 << 20, "latency_samples_s": [0.004],
            "bandwidth_samples_s": [0.1], "allgather_samples_s": [0.3], "emulation": "fake link"}


class FakeSession:
    """Stands in for a LinkSession: a link test that returns fixed numbers, no processes."""

    world_size = 2
    emulation = "fake"

    def measure_link(self):
        return link_section(RAW_LINK, self.emulation), dict(RAW_LINK)


# ---- grid and fits ----

def test_sparse_batches_keeps_ends_and_spreads():
    assert sparse_batches([1, 2, 4, 8, 16, 32], 4) == (1, 4, 8, 32)
    assert sparse_batches([8, 1, 2], 4) == (1, 2, 8)
    picked = sparse_batches(range(1, 65), 3)
    assert picked[0] == 1 and picked[-1] == 64 and len(picked) == 3
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        sparse_batches([0, 4])


def test_compute_grid_covers_local_equal_and_uneven_shares():
    codecs = [get_codec("fp32"), get_codec("sm4"), get_codec("sm16")]
    shapes = compute_grid([197], [1, 8], 2, codecs)
    kinds = {(s.kind, s.num_own_tokens, s.num_kv_vectors) for s in shapes}
    # local; equal share seeing everything; equal share seeing the fewest vectors (sm16: ceil(98/16) = 7); uneven
    assert kinds == {("local", 197, 197), ("equal-cr1", 99, 197), ("equal-max-cr", 99, 106), ("uneven", 49, 197)}
    assert all(s.num_kv_vectors >= s.num_own_tokens for s in shapes)
    # batches 1 and 8 at each pair, then the equal share at batch 8's micro-batch slices 4 and 2
    assert [(s.batch, s.kind) for s in shapes[8:]] == [(4, "equal-cr1"), (2, "equal-cr1")] and len(shapes) == 10


def test_compute_grid_times_the_micro_batch_slices_that_identify_the_fixed_cost():
    """A grid of one batch size cannot tell the per-call fixed cost from the per-token terms: the slices a
    micro-batched plan runs (B/2, B/4) give the same (n, kv) at other batch sizes."""
    shapes = compute_grid([197], [8], 4, [get_codec("fp32")])
    equal = sorted(s.batch for s in shapes if s.kind == "equal-cr1")
    assert equal == [2, 4, 8]
    assert sorted(s.batch for s in compute_grid([197], [1, 2, 4], 2, [get_codec("fp32")])
                  if s.kind == "equal-cr1") == [1, 2, 4]  # 2 and 1 already sampled: nothing added
    assert {s.batch for s in compute_grid([4], [1], 2, [get_codec("fp32")])} == {1}  # batch 1: no slices


def test_fit_relative_recovers_a_known_table():
    truth = ComputeTable(fixed_s=2e-4, per_token_s=3e-5, per_kv_s=1e-5, per_token_kv_s=4e-8)
    shapes = [(b, n, kv) for b in (1, 4, 32) for n, kv in ((197, 197), (99, 197), (99, 106), (49, 197))]
    samples = [ComputeSample(b, n, kv, truth.layer_seconds(b, n, kv)) for b, n, kv in shapes]
    fitted = fit_relative(samples, request_overhead_s=0.01)
    for b, n, kv in shapes:
        assert fitted.layer_seconds(b, n, kv) == pytest.approx(truth.layer_seconds(b, n, kv), rel=1e-6)
    assert fitted.request_overhead_s == 0.01 and fitted.samples == tuple(samples)


def test_fit_relative_sets_aside_a_point_timed_in_a_slow_spell():
    truth = ComputeTable(fixed_s=2e-4, per_token_s=3e-5, per_kv_s=1e-5, per_token_kv_s=4e-8)
    shapes = [(b, n, kv) for b in (1, 4, 8, 32) for n, kv in ((197, 197), (99, 197), (99, 106), (49, 197))]
    wobble = [1.02, 0.98, 1.01, 0.99]  # the grid's ordinary noise
    samples = [
        ComputeSample(b, n, kv, truth.layer_seconds(b, n, kv) * wobble[i % 4]) for i, (b, n, kv) in enumerate(shapes)
    ]
    slow = shapes.index((32, 99, 106))
    samples[slow] = dataclasses.replace(samples[slow], seconds_per_layer=1.5 * samples[slow].seconds_per_layer)
    fitted = fit_relative(samples)
    for b, n, kv in shapes:
        assert fitted.layer_seconds(b, n, kv) == pytest.approx(truth.layer_seconds(b, n, kv), rel=0.03)
    assert fitted.samples == tuple(samples)  # every sample stays in the profile
    plain = ComputeTable.fit(samples, relative=True)
    assert abs(plain.layer_seconds(32, 99, 106) / truth.layer_seconds(32, 99, 106) - 1) > 0.03


def test_fit_overhead_is_affine_and_non_negative():
    fit = fit_overhead([(1, 197, 0.001 + 2e-6 * 197), (8, 197, 0.001 + 2e-6 * 8 * 197),
                        (32, 197, 0.001 + 2e-6 * 32 * 197)])
    assert fit.fixed_s == pytest.approx(0.001, rel=1e-6) and fit.per_token_s == pytest.approx(2e-6, rel=1e-6)
    flat = fit_overhead([(1, 10, 0.5), (2, 10, 0.1)])  # decreasing: no negative slope
    assert flat.per_token_s >= 0 and flat.fixed_s >= 0


def test_measure_compute_on_a_tiny_model_restores_affinity_and_threads():
    model = build_model("vit-tiny-test", seed=0)
    before_cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    before_threads = torch.get_num_threads()
    seen = []
    table, overhead, shapes = measure_compute(model, [17], [1, 2], 2, [get_codec("fp32"), get_codec("sm4")],
                                              torch.device("cpu"), core=0, warmup=0, repeats=1,
                                              progress=lambda done, total, label: seen.append((done, total)))
    assert len(table.samples) == len(shapes) == 8
    assert all(s.seconds_per_layer > 0 for s in table.samples)
    assert table.layer_seconds(1, 17, 17) > 0 and overhead.fixed_s >= 0
    assert seen[-1][0] == seen[-1][1] == len(shapes) + 2  # blocks, then embed+head for each batch
    if before_cores is not None:
        assert os.sched_getaffinity(0) == before_cores
    assert torch.get_num_threads() == before_threads


def test_pinned_restores_even_when_the_body_raises():
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with pinned(0):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == threads


# ---- staging ----

def test_staging_is_absent_on_a_cpu_and_says_so():
    report = measure_staging(torch.device("cpu"))
    assert report.table.present is False and report.table.d2h_seconds(1 << 20) == 0.0
    assert "no device<->host staging" in report.note and report.to_dict()["present"] is False


def test_fit_copy_recovers_latency_and_bandwidth():
    from edgeprism.profile.schema import StagingSample

    samples = [StagingSample("d2h", n, 1e-5 + 8 * n / 1e11) for n in (4096, 1 << 20, 1 << 24)]
    latency_s, bandwidth_bps = fit_copy(samples)
    assert latency_s == pytest.approx(1e-5, rel=1e-3) and bandwidth_bps == pytest.approx(1e11, rel=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: staging is measured only on a GPU")
def test_staging_is_measured_on_a_gpu_pinned_and_pageable():
    report = measure_staging(torch.device("cuda"), sizes=(1 << 12, 1 << 20, 1 << 24), repeats=3)
    assert report.table.present and report.table.d2h_bandwidth_bps > 0 and report.table.h2d_bandwidth_bps > 0
    assert {(f.direction, f.pinned) for f in report.fits} == {("d2h", True), ("h2d", True), ("d2h", False),
                                                            ("h2d", False)}
    assert len(report.table.samples) == 6 and "pinned" in report.note


# ---- energy ----

def test_energy_without_a_meter_is_the_labelled_power_model():
    energy = measure_energy(lambda: None, torch.device("cpu"), meter_kind="modelled")
    model = get_power_model("generic-cpu-core")
    assert energy.source == "modelled" and energy.compute_w == model.compute_w and energy.idle_w == model.idle_w
    assert energy.network_w == pytest.approx(model.phase_power_w()["network_s"])
    assert "model:generic-cpu-core" in energy.meter


def test_energy_with_a_meter_is_metered_per_phase():
    energy = measure_energy(lambda: None, torch.device("cpu"), meter=FakeMeter(power_w=7.0), window_s=0.05)
    radio = get_power_model("generic-cpu-core")
    assert energy.source == "metered"
    assert energy.idle_w == pytest.approx(7.0) and energy.compute_w == pytest.approx(7.0)
    assert energy.network_w == pytest.approx(7.0 + 0.5 * (radio.radio_tx_w + radio.radio_rx_w))
    assert "fake" in energy.meter and "model:" in energy.meter  # the radio part says where it came from


def test_the_metered_compute_window_runs_the_models_first_block_on_n_tokens():
    model = build_model("vit-tiny-test")
    shapes = []
    model.blocks[0].register_forward_hook(lambda block, args, out: shapes.append(tuple(out.shape)))
    energy = measure_energy(one_block(model, 5, torch.device("cpu")), torch.device("cpu"),
                            meter=FakeMeter(power_w=7.0), window_s=0.05)
    assert energy.source == "metered" and shapes and set(shapes) == {(1, 5, model.config.hidden_size)}


# ---- fidelity ----

def _rows_file(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_fidelity_rows_keep_the_worst_with_default_weighting(tmp_path):
    rows = [
        # the runtime's default weighting (size-aware, normalised input averaged): these two compete
        {"model": "vit-tiny-test", "world_size": 2, "codec": "sm4", "size_aware": True, "average": "normed",
         "metric": "a", "value": 0.9, "reference_value": 1.0, "loss": 0.1},
        {"model": "vit-tiny-test", "world_size": 2, "codec": "sm4", "size_aware": True, "average": "normed",
         "metric": "b", "value": 0.7, "reference_value": 1.0, "loss": 0.3},
        # another weighting: ignored while a default-weighting row exists, however bad it is
        {"model": "vit-tiny-test", "world_size": 2, "codec": "sm4", "size_aware": False, "average": "residual",
         "metric": "c", "value": 0.1, "reference_value": 1.0, "loss": 0.9},
        {"model": "other", "world_size": 2, "codec": "int8", "metric": "a", "value": 0.0, "reference_value": 1.0},
        {"model": "vit-tiny-test", "world_size": 3, "codec": "fp16", "metric": "a", "value": 0.5,
         "reference_value": 1.0},
    ]
    loaded = load_fidelity_rows(_rows_file(tmp_path, rows))
    chosen = select_rows(loaded, "vit-tiny-test", 2)
    assert set(chosen) == {"sm4"} and chosen["sm4"]["metric"] == "b"
    entries = {e.codec: e for e in codec_entries([get_codec("sm4"), get_codec("int8")], 64, chosen)}
    assert entries["sm4"].loss == pytest.approx(0.3) and entries["sm4"].cr == 4
    assert entries["int8"].loss is None and entries["int8"].wire_bytes_per_token > 0


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "has no rows"),
        ('{"codec": "sm4"}\n', "needs the fields"),
        (
            '{"codec": "sm4", "metric": "m", "value": 1.0, "reference_value": 1.0}\n{not json\n',
            r"rows.jsonl:2: not a JSON row",
        ),
        ('{"codec": "sm4", "metric": "m", "value": "high", "reference_value": 1.0}\n', "value must be a number"),
    ],
)
def test_bad_fidelity_files_are_clear_errors(tmp_path, text, match):
    path = tmp_path / "rows.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_fidelity_rows(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_fidelity_rows(tmp_path / "missing.jsonl")


def test_a_model_without_an_evaluation_set_is_unmeasured():
    rows, note = evaluate_fidelity("vit-base-patch16-224", ["sm4"], 2, limit=4)
    assert rows == [] and note.startswith("fidelity not measured") and "no evaluation set" in note


# ---- link ----

def test_link_section_uses_the_all_gather_rate_and_names_its_method():
    link = link_section(RAW_LINK, "netns+tbf: wifi4")
    assert link.bandwidth_bps == 3.0e7 and link.latency_s == 0.004 and link.medium == "switched"
    assert "all-gather" in link.method and "one-way broadcast 60.00 Mbit/s" in link.method
    assert link.emulation.startswith("netns+tbf: wifi4") and "fake link" in link.emulation
    with pytest.raises(ValueError, match="no usable all-gather rate"):
        link_section({**RAW_LINK, "allgather_bandwidth_bps": float("inf")})


def test_link_section_takes_the_lower_quartile_latency_and_the_burst():
    link = link_section({**RAW_LINK, "latency_low_s": 0.003, "burst_bytes": 32768.0})
    assert link.latency_s == 0.003 and link.burst_bytes == 32768.0
    assert "lower quartile" in link.method and "32.0 KiB" in link.method
    assert link_section(RAW_LINK).burst_bytes == 0.0  # an older link test: no burst measured


def test_burst_estimate_from_an_idle_probe():
    from edgeprism.testbed.linktest import burst_estimate, lower_quartile

    # 512 KiB at 8 Mbit/s (1 MB/s) with 3 ms latency: 32 KiB free means (524288 - 32768) / 1e6 s of waiting
    t = 0.003 + (524288 - 32768) / 1e6
    assert burst_estimate(524288, (t, t + 1e-4, t - 1e-4), 0.003, 8e6) == pytest.approx(32768, abs=1)
    assert burst_estimate(524288, (10.0,), 0.003, 8e6) == 0.0  # slower than the rate: no credit
    assert burst_estimate(524288, (), 0.003, 8e6) == 0.0
    assert lower_quartile((5.0, 1.0, 9.0, 2.0, 3.0)) == 2.0


# ---- the whole profile, with a fake link ----

def test_run_profile_builds_a_valid_profile_for_a_vit(tmp_path):
    options = ProfileOptions(model="vit-tiny-test", batches=(1, 2, 3), codecs=("fp32", "int8", "sm4a+int8"),
                             warmup=0, repeats=1, evaluate=False, meter="modelled",
                             compute_on="here")
    messages = []
    report = run_profile(options, FakeSession(), message=messages.append)
    profile = report.profile
    assert profile.world_size == 2 and profile.device_speeds == (1.0, 1.0)
    assert [c.codec for c in profile.codecs] == ["fp32", "int8", "sm4a+int8"]
    assert all(c.loss is None for c in profile.codecs)
    assert all(c.encode_s_per_vector > 0 and c.decode_s_per_vector > 0 for c in profile.codecs)  # codec timing
    assert profile.link.bandwidth_bps == 3.0e7 and profile.staging.present is False
    assert profile.energy.source == "modelled" and profile.host.device_kind == "cpu"
    # float32 pixels of one 8x8 patch, plus the grid shape (two int64) spread over the 8 tokens rank 1 gets
    assert profile.input_bytes_per_token == pytest.approx(3 * 8 * 8 * 4 + 16 / 8)
    assert profile.output_bytes_per_row == 4.0 * (64 + 1)
    assert report.sampled_batches == (1, 2, 3) and report.token_counts == (17,)
    assert "fidelity not measured" in report.fidelity_note and any(m.startswith("link:") for m in messages)
    path = tmp_path / "p.json"
    profile.save(path)
    assert Profile.load(path, expect_model="vit-tiny-test", expect_world_size=2) == profile
    summary = report.to_dict()
    assert summary["profile_seconds"] > 0 and "latency_samples_s" not in summary["link_test"]


def test_run_profile_measures_a_kv_share_through_the_evaluate_path():
    # the split model's fidelity over the loopback group (PositionWise on the overlapped path), its wire bytes from
    # the codec (a key and a value per token sent as such), its timing per wire vector of its inner format
    options = ProfileOptions(model="vit-tiny-test", batches=(1, 2), codecs=("int8", "kv50:int8"), warmup=0,
                             repeats=1, eval_limit=4, meter="modelled", compute_on="here")
    report = run_profile(options, FakeSession())
    int8, kv = report.profile.codec("int8"), report.profile.codec("kv50:int8")
    assert kv.metric == "embedding_cosine" and kv.loss is not None and kv.loss < 0.01
    assert kv.kv_tokens(100) == 50 and kv.wire_dtype == "int8" and kv.cr == 1
    assert kv.wire_bytes_per_token == pytest.approx(1.5 * int8.wire_bytes_per_token)
    assert kv.encode_s_per_vector > 0 and kv.decode_s_per_vector > 0


def test_run_profile_records_each_codecs_label_shift_for_the_near_tie_guard(tmp_path):
    # a decoder's evaluation scores next tokens: its label shift (runtime/guard.py) lands in the profile, 0 for
    # exact fp32 and more for a coarse codec, and survives the file
    options = ProfileOptions(model="gpt2-tiny-test", batches=(1,), codecs=("fp32", "int4"), warmup=0, repeats=1,
                             eval_limit=2, meter="modelled", compute_on="here")
    profile = run_profile(options, FakeSession()).profile
    fp32, int4 = profile.codec("fp32"), profile.codec("int4")
    assert fp32.label_shift is not None and int4.label_shift is not None
    assert fp32.label_shift < 1e-5 < int4.label_shift <= 2.0
    path = tmp_path / "p.json"
    profile.save(path)
    assert Profile.load(path).codec("int4").label_shift == int4.label_shift


def test_run_profile_for_a_text_model_times_each_sequence_length(tmp_path):
    rows = _rows_file(tmp_path, [{"model": "bert-tiny-test", "world_size": 2, "codec": "sm2", "metric": "cos",
                                  "value": 0.95, "reference_value": 1.0}])
    options = ProfileOptions(model="bert-tiny-test", batches=(1, 4), seq_lens=(8, 16), codecs=("fp32", "sm2"),
                             warmup=0, repeats=1, fidelity_file=str(rows), meter="modelled",
                             compute_on="here")
    report = run_profile(options, FakeSession())
    assert report.token_counts == (8, 16)
    assert {s.num_own_tokens for s in report.profile.compute.samples if s.num_own_tokens == s.num_kv_vectors} == {8, 16}
    assert report.profile.codec("sm2").loss == pytest.approx(0.05) and report.profile.codec("fp32").loss is None
    model = build_model("bert-tiny-test", seed=0)
    # ids, attention mask, token types (8 bytes a token each) plus one row length spread over the 8 tokens sent
    assert input_bytes_per_token(model, 16, 2, None) == pytest.approx(3 * 8 + 8 / 8)


@pytest.mark.parametrize("change, match", [
    ({"world_size": 1}, "at least 2 ranks"),
    ({"batches": (0, 4)}, "batch sizes >= 1"),
    ({"repeats": 0}, "--repeats 0"),
    ({"codecs": ("sm0",)}, "sm0"),
    ({"fidelity_file": "/nonexistent/rows.jsonl"}, "does not exist"),
    ({"eval_limit": 0}, "--eval-limit 0"),
])
def test_bad_options_fail_before_measuring(change, match):
    options = ProfileOptions(model="vit-tiny-test", **change)
    with pytest.raises(ValueError, match=match):
        validate_options(options)


@pytest.mark.parametrize("change, match", [
    ({"model": "vit-tiny-test", "seq_lens": (8,)}, "--seq-lens is for text models"),
    ({"model": "bert-tiny-test", "image_size": 32}, "--image-size is for ViT models"),
    ({"model": "bert-tiny-test", "seq_lens": (8, 4096)}, "outside 1..128"),
    ({"model": "bert-tiny-test", "seq_lens": (1,)}, "1 tokens cannot be split over 2 ranks"),
])
def test_token_counts_that_do_not_fit_the_model_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        validate_options(ProfileOptions(**change))


def test_a_kv_share_for_a_decoder_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match=r"kv50:int8.*gpt2-tiny-test.*decoder.*profile int8 instead"):
        validate_options(ProfileOptions(model="gpt2-tiny-test", codecs=("fp16", "kv50:int8")))
    validate_options(ProfileOptions(model="vit-tiny-test", codecs=("fp16", "kv50:int8")))


# ---- validation bookkeeping ----

def test_held_out_points_avoid_the_sampled_ones():
    assert held_out_batches([1, 2, 4, 8, 16, 32], (1, 4, 8, 32)) == (2, 6, 16)
    assert held_out_batches([1, 4], (1, 4)) == (2,)
    profile = synthetic_profile("vit-base-patch16-224")
    codecs = held_out_codecs(profile)
    assert codecs == ("int8", "sm4a+int8") and "fp32" not in codecs
    assert held_out_token_counts(profile, (197,)) == (197,)
    assert held_out_token_counts(synthetic_profile("bert-base"), (32, 128)) == (64,)
    points = validation_points(profile, [8, 2], [197], codecs)
    assert [p.mode for p in points] == ["distributed"] * 4 + ["local"] * 2
    assert [p.batch for p in points if p.mode == "local"] == [2, 8]
    with pytest.raises(ValueError, match="not in the profile"):
        validation_points(profile, [2], [197], ["sm3"])


def test_compare_predicts_the_plan_that_ran():
    profile = synthetic_profile("vit-base-patch16-224")
    point = ValidationPoint("distributed", 2, 197, "int8")
    plan = plan_for(profile, point, (99, 98))
    assert plan.mode == "distributed" and plan.token_counts == (99, 98) and plan.cr == 1
    row = compare(profile, point, {"latency_s": 1.0, "token_ranges": [[0, 99], [99, 197]], "compute_s": 0.5,
                                   "collective_s": 0.4})
    assert row.predicted_s > 0 and row.rel_error == pytest.approx(abs(row.predicted_s - 1.0))
    local = compare(profile, ValidationPoint("local", 2, 197), {"latency_s": 0.7, "token_ranges": [[0, 197]]})
    assert local.predicted_network_s == 0 and local.token_counts == (197,)
    assert set(row.to_dict()) >= {"mode", "batch", "codec", "measured_s", "predicted_s", "rel_error"}


def test_link_measurement_type_is_the_schema_one():
    assert isinstance(FakeSession().measure_link()[0], LinkMeasurement)


class InProcessSession:
    """A one-device session that runs the rank function in this process (no launcher)."""

    world_size = 1
    emulation = ""

    def run(self, fn, args, *, on_progress=None, dist_backend="auto", device="cpu", **_):
        from edgeprism.comm.context import init_distributed

        lines = []
        result = json.loads(json.dumps(fn(init_distributed(dist_backend, device), json.loads(json.dumps(args)),
                                          lines.append)))
        for line in lines:
            on_progress(line)
        return result


def test_compute_job_times_the_grid_and_reports_progress(monkeypatch):
    from edgeprism.profile.compute_job import measure_on_session

    for key in ("RANK", "WORLD_SIZE", "EDGEPRISM_CORES", "EDGEPRISM_LINK_FILE"):
        monkeypatch.delenv(key, raising=False)
    seen = []
    table, _overhead, shapes, speeds, raw = measure_on_session(
        InProcessSession(), "bert-tiny-test", None, 0, [8], [1, 2], [get_codec("fp32")], warmup=0, repeats=1,
        num_layers=2, progress=lambda done, total, label: seen.append((done, total, label)))
    assert speeds == (1.0,) and len(table.samples) == len(shapes) == 2  # a world of one: local shapes only
    assert [s.kind for s in shapes] == ["local", "local"] and raw["alone_s"] and raw["overhead_s"]
    assert seen[-1][0] == seen[-1][1] == 4 and "rank 0 alone" in seen[0][2]


def test_median_run_merges_passes():
    from edgeprism.jobs.validate import median_run

    runs = [{"latency_s": 1.0, "compute_s": 0.5, "collective_s": 0.4, "token_ranges": [[0, 9], [9, 17]]},
            {"latency_s": 3.0, "compute_s": 1.5, "collective_s": 0.2, "token_ranges": [[0, 9], [9, 17]]},
            {"latency_s": 2.0, "compute_s": 1.0, "collective_s": 0.3, "token_ranges": [[0, 9], [9, 17]]}]
    merged = median_run(runs)
    assert merged["latency_s"] == 2.0 and merged["compute_s"] == 1.0 and merged["collective_s"] == 0.3
    assert merged["latencies_s"] == [1.0, 3.0, 2.0] and merged["token_ranges"] == [[0, 9], [9, 17]]


def test_critical_path_takes_the_slowest_rank_per_call_and_leaves_steady_differences_to_speeds():
    from edgeprism.profile.compute_job import critical_path

    # rank 1 is steadily 2x slower; in pass 2 rank 0 has a hiccup on shape 0
    rank0 = [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    rank1 = [[2.0, 2.0, 2.0], [4.0, 4.0, 4.0]]
    rank0_hiccup = [[1.0, 1.5, 1.0], [2.0, 2.0, 2.0]]
    speeds, shape_s = critical_path([rank0, rank1])
    assert speeds == (1.0, 0.5) and shape_s == [1.0, 2.0]
    speeds, shape_s = critical_path([rank0_hiccup, [[1.0, 1.0, 1.2], [2.0, 2.0, 2.0]]])
    assert speeds == (1.0, 1.0) and shape_s == [1.2, 2.0]  # per pass: max(1,1), max(1.5,1), max(1,1.2)
