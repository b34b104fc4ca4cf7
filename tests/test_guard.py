"""The near-tie guard (runtime/guard.py, api/guard.py): which answers it checks, which rows it reruns, and that
the rerun rows of a real 2-rank split served over HTTP are exactly one device's answer."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from edgeprism.runtime.guard import (
    exact_answer,
    label_margins,
    rows_to_rerun,
    splice_rows,
    take_rows,
)
from edgeprism.runtime.metrics import MetricsRow


def _row(mode: str, codec: str = "", fallback: str = "") -> MetricsRow:
    fields = {name: 0 for name in MetricsRow.__dataclass_fields__}
    fields.update(request_id="r", mode=mode, plan={"codec": codec}, fallback=fallback, timeline=[], fidelity_loss=0.0,
                  cpu_s=None, energy_source="modelled", link_bandwidth_bps=1.0, blew_prediction=False)
    return MetricsRow(**fields)


@pytest.mark.parametrize("mode, codec, fallback, exact", [
    ("local", "", "", True),
    ("distributed", "fp32", "", True),
    ("distributed", "kv50:fp32", "", True),
    ("distributed", "fp16", "", False),      # lossless for the planner's budget, not bit for bit
    ("distributed", "bf16", "", False),
    ("distributed", "int8", "", False),
    ("distributed", "kv100:fp16", "", False),
    ("distributed", "tc:0123456789ab", "", False),
    ("distributed", "int8", "peer 1 died", True),  # a fallback answered on rank 0
])
def test_which_answers_the_guard_checks(mode, codec, fallback, exact):
    assert exact_answer(_row(mode, codec, fallback)) is exact


def test_margins_and_the_rows_to_rerun():
    labels = [[("a", 0.50), ("b", 0.49)], [("a", 0.9), ("b", 0.05)], [("c", 1.0)]]
    margins = label_margins(labels)
    assert margins[:2] == pytest.approx([0.01, 0.85]) and math.isinf(margins[2])
    assert rows_to_rerun(margins, 0.05) == [0]
    assert rows_to_rerun(margins, 0.9) == [0, 1]
    assert rows_to_rerun(margins, 0.0) == []  # 0 turns the guard off
    with pytest.raises(ValueError, match="must be >= 0"):
        rows_to_rerun(margins, -0.1)


def test_label_shift_bounds_every_flip_by_the_margin_the_split_answered_with():
    from edgeprism.evaluate.fidelity import label_shift, top2_margins

    reference = torch.log(torch.tensor([[0.50, 0.30, 0.20], [0.2, 0.7, 0.1]]))
    candidate = torch.log(torch.tensor([[0.45, 0.35, 0.20], [0.2, 0.7, 0.1]]))
    shift = label_shift(reference, candidate)
    assert shift.metric == "label_shift" and shift.items == 2 and not shift.higher_is_better
    assert shift.value == pytest.approx(0.10, abs=1e-6)  # p0 fell 0.05, p1 rose 0.05: their difference moved 0.10
    assert shift.loss == 0.0  # reported, never budgeted
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # random perturbations: a flipped row's own margin never exceeds the shift
        ref = torch.randn(64, 5, generator=g)
        got = ref + 0.3 * torch.randn(64, 5, generator=g)
        flipped = ref.argmax(-1) != got.argmax(-1)
        assert flipped.any()
        assert float(top2_margins(got)[flipped].max()) <= label_shift(ref, got).value + 1e-6


def test_the_profile_keeps_each_codecs_largest_label_shift():
    from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile
    from edgeprism.profile.fidelity import label_shifts
    from edgeprism.profile.schema import Profile
    from edgeprism.runtime.guard import DEFAULT_GUARD_MARGIN, GUARD_HEADROOM, guard_margin

    rows = [{"codec": "int8", "metric": "label_shift", "value": 0.02, "reference_value": 0.0, "model": "m"},
            {"codec": "int8", "metric": "label_shift", "value": 0.07, "reference_value": 0.0, "model": "m"},
            {"codec": "int8", "metric": "top1_agreement", "value": 0.99, "reference_value": 1.0, "model": "m"},
            {"codec": "fp16", "metric": "label_shift", "value": 0.5, "reference_value": 0.0, "model": "other"},
            {"codec": "fp16", "metric": "label_shift", "value": 0.001, "reference_value": 0.0, "model": "m",
             "world_size": 2}]
    assert label_shifts(rows, "m", 2) == {"int8": 0.07, "fp16": 0.001}
    assert label_shifts(rows, "m", 4) == {"int8": 0.07}
    codecs = [dataclasses.replace(c, label_shift=0.07) if c.codec == "int8" else c
              for c in synthetic_codecs(64)[:3]]
    profile = synthetic_profile("vit-tiny-test", codecs=codecs)
    again = Profile.from_json(profile.to_json())
    assert again.codec("int8").label_shift == 0.07 and again.codec("fp16").label_shift is None
    assert "label_shift" not in profile.to_dict()["codecs"][1]  # unmeasured: no key, the hash is unchanged
    assert guard_margin(profile, "int8") == pytest.approx(GUARD_HEADROOM * 0.07)
    assert guard_margin(profile, "fp16") == DEFAULT_GUARD_MARGIN  # not measured
    assert guard_margin(profile, "lb3o4r") == DEFAULT_GUARD_MARGIN  # not in the profile (a forced plan)
    assert guard_margin(profile, "int8", fixed=0.0) == 0.0 and guard_margin(profile, "int8", fixed=0.2) == 0.2
    with pytest.raises(ValueError, match="label_shift must be in"):
        dataclasses.replace(codecs[2], label_shift=3.0)


def test_splice_replaces_only_the_rerun_rows():
    outputs = {"pooled": torch.zeros(4, 3), "mean": torch.ones(4, 3)}
    rerun = {"pooled": torch.full((2, 3), 7.0), "mean": torch.full((2, 3), 9.0)}
    spliced = splice_rows(outputs, [1, 3], rerun)
    assert spliced["pooled"][:, 0].tolist() == [0, 7, 0, 7] and spliced["mean"][:, 0].tolist() == [1, 9, 1, 9]
    assert outputs["pooled"].abs().sum() == 0  # the answer itself is not changed in place
    assert take_rows(spliced, [1, 3])["pooled"].equal(rerun["pooled"])
    with pytest.raises(ValueError, match="without"):
        splice_rows(outputs, [1], {"pooled": torch.zeros(1, 3)})
    with pytest.raises(ValueError, match="rerun's 'mean'"):
        splice_rows(outputs, [1], {"pooled": torch.zeros(1, 3), "mean": torch.zeros(1, 5)})


def test_the_api_refuses_a_guard_margin_out_of_range():
    pytest.importorskip("starlette")
    from edgeprism.api import ApiConfig

    assert ApiConfig(guard_margin=0).guard_margin == 0
    for bad in (-0.01, 1.0, float("nan")):
        with pytest.raises(ValueError, match="guard_margin"):
            ApiConfig(guard_margin=bad)


# --- over a real 2-rank split ---
@pytest.fixture(scope="module")
def split_engine():
    pytest.importorskip("starlette")
    pytest.importorskip("PIL")
    from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile
    from edgeprism.runtime import EngineConfig, launch_local

    # Slow compute and a fast link: the planner splits, over fp16 only (lossless for the budget, not exact).
    profile = synthetic_profile("vit-tiny-test", bandwidth_bps=1e10, latency_s=1e-5, seconds_per_image=3000,
                                codecs=synthetic_codecs(64)[1:2])
    config = EngineConfig(learn_compute=False, learn_link=False, learn_speeds=False)
    with launch_local(2, "vit-tiny-test", profile, config=config) as engine:
        yield engine


def _classify(engine, guard_margin: float | None, blobs: list[bytes]):
    from starlette.testclient import TestClient

    from api_adapters import PillowIO
    from edgeprism.api import ApiConfig, make_app

    io = PillowIO("vit-tiny-test", size=32, labels=["cat", "dog", "ship", "truck"])
    files = [("file", (f"{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]
    with TestClient(make_app(engine, io, ApiConfig(guard_margin=guard_margin))) as client:
        reply = client.post("/v1/classify", files=files, data={"top_k": "1"})
    assert reply.status_code == 200, reply.text
    return io, reply.json()


def test_rows_under_the_margin_are_answered_by_one_device(split_engine):
    from api_adapters import png_bytes

    blobs = [png_bytes(seed) for seed in range(5)]
    io, body = _classify(split_engine, 0.99, blobs)  # a fixed margin: every row but the clearest
    calls = body["edgeprism"]["calls"]
    assert calls[0]["mode"] == "distributed" and calls[0]["codec"] == "fp16"
    assert calls[1]["mode"] == "local"
    rerun = [item["index"] for item in body["data"] if item.get("near_tie_rerun")]
    assert 0 < len(rerun) == calls[1]["rows"], (rerun, calls)
    with torch.no_grad():
        alone = io.classify(split_engine.model(io.encode_images(blobs)), None, top_k=1)
    for index in rerun:  # one device's label and score, to float rounding
        label = body["data"][index]["labels"][0]
        assert (label["label"], label["score"]) == (alone[index][0][0], pytest.approx(alone[index][0][1], abs=1e-6))
    assert all(len(item["labels"]) == 1 for item in body["data"])  # top_k as asked, though the guard read 2

    _, by_profile = _classify(split_engine, None, blobs)  # fp16 has no measured shift here: the default margin
    assert all(label["score"] for item in by_profile["data"] for label in item["labels"])

    _, unguarded = _classify(split_engine, 0.0, blobs)
    assert unguarded["edgeprism"]["mode"] == "distributed" and "calls" not in unguarded["edgeprism"]
    assert not any(item.get("near_tie_rerun") for item in unguarded["data"])


def test_serve_refuses_a_bad_guard_margin_before_starting(capsys):
    from edgeprism.cli.main import main

    assert main(["serve", "--model", "vit-tiny-test", "--synthetic-profile", "--world-size", "1", "--http",
                 "--guard-margin", "1.5"]) == 2
    assert "--guard-margin 1.5 must be in [0, 1)" in capsys.readouterr().err
