"""The versioned profile file: round trip, hashing, and a clear ValueError for every bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edgeprism.models.config import get_config
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.profile import (
    SCHEMA_VERSION,
    CodecFidelity,
    ComputeSample,
    ComputeTable,
    LinkMeasurement,
    Profile,
    StagingTable,
)


@pytest.fixture
def profile() -> Profile:
    return synthetic_profile(world_size=3, device_speeds=(1.0, 0.8, 0.5), staging=True)


def test_json_round_trip_is_exact(profile, tmp_path):
    assert Profile.from_json(profile.to_json()) == profile
    path = tmp_path / "p.json"
    profile.save(path)
    loaded = Profile.load(path, expect_model="vit-base-patch16-224", expect_world_size=3)
    assert loaded == profile
    assert loaded.profile_hash() == profile.profile_hash()
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION


def test_profile_hash_changes_with_content(profile):
    other = dataclasses.replace(profile, link=LinkMeasurement(latency_s=0.004, bandwidth_bps=5e7))
    assert len(profile.profile_hash()) == 16
    assert other.profile_hash() != profile.profile_hash()


def test_str_is_one_readable_line(profile):
    text = str(profile)
    assert "\n" not in text and "vit-base-patch16-224" in text and "world_size=3" in text


def _write(tmp_path, text: str):
    path = tmp_path / "bad.json"
    path.write_text(text)
    return path


def test_not_json_and_truncated_are_refused(profile, tmp_path):
    with pytest.raises(ValueError, match="not valid JSON"):
        Profile.load(_write(tmp_path, "hello"))
    text = profile.to_json()
    with pytest.raises(ValueError, match=r"not valid JSON \(corrupt or truncated"):
        Profile.load(_write(tmp_path, text[: len(text) // 2]))
    with pytest.raises(ValueError, match="not valid JSON"):
        Profile.load(_write(tmp_path, ""))
    with pytest.raises(ValueError, match="JSON object"):
        Profile.load(_write(tmp_path, "[1, 2]"))
    with pytest.raises(ValueError, match="does not exist"):
        Profile.load(tmp_path / "missing.json")


def test_wrong_schema_version_is_refused(profile, tmp_path):
    data = profile.to_dict()
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match=f"schema_version {SCHEMA_VERSION + 1} is not supported"):
        Profile.load(_write(tmp_path, json.dumps(data)))
    del data["schema_version"]
    with pytest.raises(ValueError, match="schema_version None"):
        Profile.from_dict(data)


def test_missing_unknown_and_mistyped_fields_name_the_field(profile):
    data = profile.to_dict()
    del data["link"]
    with pytest.raises(ValueError, match="missing field 'link'"):
        Profile.from_dict(data)
    data = profile.to_dict()
    del data["compute"]["per_kv_s"]
    with pytest.raises(ValueError, match=r"profile.compute is missing field 'per_kv_s'"):
        Profile.from_dict(data)
    data = profile.to_dict()
    data["link"]["colour"] = "blue"
    with pytest.raises(ValueError, match=r"profile.link has unknown field\(s\) \['colour'\]"):
        Profile.from_dict(data)
    data = profile.to_dict()
    data["world_size"] = "3"
    with pytest.raises(ValueError, match="profile.world_size must be an integer"):
        Profile.from_dict(data)
    data = profile.to_dict()
    data["energy"]["source"] = "guessed"
    with pytest.raises(ValueError, match=r"profile.energy.source must be one of \['metered', 'modelled'\]"):
        Profile.from_dict(data)


def test_other_model_config_or_world_size_is_refused(profile, tmp_path):
    path = tmp_path / "p.json"
    profile.save(path)
    with pytest.raises(ValueError, match="made for model vit-base-patch16-224, not bert-base"):
        Profile.load(path, expect_model="bert-base")
    deeper = dataclasses.replace(get_config("vit-base-patch16-224"), num_layers=24)
    with pytest.raises(ValueError, match="another vit-base-patch16-224 architecture"):
        Profile.load(path, expect_model=deeper)
    Profile.load(path, expect_model=get_config("vit-base-patch16-224"))
    with pytest.raises(ValueError, match="made for world size 3, not 4"):
        Profile.load(path, expect_world_size=4)


def test_inconsistent_contents_are_refused(profile):
    data = profile.to_dict()
    data["config_hash"] = "0" * 16
    with pytest.raises(ValueError, match="does not match its model"):
        Profile.from_dict(data)
    with pytest.raises(ValueError, match="2 device speeds for world_size 3"):
        dataclasses.replace(profile, device_speeds=(1.0, 1.0))
    with pytest.raises(ValueError, match="lists a codec twice"):
        dataclasses.replace(profile, codecs=profile.codecs + profile.codecs[:1])
    with pytest.raises(ValueError, match="loss must be in"):
        CodecFidelity("x", 1, "fp32", 1.0, loss=1.5)
    with pytest.raises(ValueError, match="bandwidth_bps must be > 0"):
        LinkMeasurement(latency_s=0.001, bandwidth_bps=0.0)


def test_compute_fit_recovers_coefficients_and_clamps_at_zero():
    truth = ComputeTable(fixed_s=2e-4, per_token_s=1e-5, per_kv_s=2e-6, per_token_kv_s=3e-9)
    samples = [ComputeSample(b, n, kv, truth.layer_seconds(b, n, kv))
               for b in (1, 2, 8) for n, kv in ((10, 10), (50, 120), (99, 197), (197, 197))]
    fitted = ComputeTable.fit(samples, request_overhead_s=0.01)
    for name in ("fixed_s", "per_token_s", "per_kv_s", "per_token_kv_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6, abs=1e-12)
    assert fitted.samples == tuple(samples) and fitted.request_overhead_s == 0.01
    # Noisy data that wants a negative intercept gets a clamped, still non-negative fit.
    skewed = [ComputeSample(1, n, n, 1e-4 * n - 1e-3) for n in (20, 40, 80)]
    clamped = ComputeTable.fit(skewed)
    assert min(clamped.fixed_s, clamped.per_token_s, clamped.per_kv_s, clamped.per_token_kv_s) >= 0
    with pytest.raises(ValueError, match="zero samples"):
        ComputeTable.fit([])


def test_staging_absent_costs_nothing():
    assert StagingTable(False).d2h_seconds(10**6) == 0.0
    present = StagingTable(True, 1e-4, 8e9, 2e-4, 8e9)
    assert present.d2h_seconds(10**6) == pytest.approx(1e-4 + 1e-3)
    with pytest.raises(ValueError, match="bandwidth is 0"):
        StagingTable(True)


def test_codec_entry_from_codec_matches_exact_nbytes():
    compress = pytest.importorskip("edgeprism.compress")
    for name in ("fp32", "fp16", "int8", "sm4", "sm4a+int8", "sm16+int8"):
        codec = compress.get_codec(name)
        entry = CodecFidelity.from_codec(codec, 768, metric="top1_agreement", value=0.97, reference_value=1.0)
        for batch, n in ((1, 16 * entry.cr), (3, 5 * entry.cr)):
            assert batch * (entry.wire_bytes_per_row + n * entry.wire_bytes_per_token) == codec.nbytes(batch, n, 768)
        assert entry.loss == pytest.approx(0.03) and entry.codec == name
    assert CodecFidelity.normalised_loss(1.2, 1.0) == 0.0
    assert CodecFidelity.normalised_loss(0.5, 1.0) == 0.5
