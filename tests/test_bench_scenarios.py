"""Scenarios as data: the shipped TOML files parse, expand into jobs, and bad ones fail with the value."""

from pathlib import Path

import pytest

from edgeprism.bench.pipeline import microbatches, stage_layers
from edgeprism.bench.scenarios import JobSpec, ModelCase, load_scenario, scenario_from_dict

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_shipped_scenarios_parse():
    smoke = load_scenario(BENCHMARKS / "smoke.toml")
    assert smoke.profile == "synthetic" and len(smoke.jobs()) == 1
    full = load_scenario(BENCHMARKS / "full.toml")
    assert len(full.jobs()) == 5 * 2 * 4
    assert {j.model.label for j in full.jobs()} >= {"bert-base@128", "bert-base@256", "vit-base-patch16-224"}
    assert "segment_means:sm16" in full.jobs()[0].strategies and "segment_means" not in full.jobs()[0].strategies


@pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_scenario_expands_into_jobs(path):
    jobs = load_scenario(path).jobs()
    assert jobs and all(job.batches and job.strategies for job in jobs)


def test_mixed_device_scenarios_expand_one_job_per_device_set():
    jobs = load_scenario(BENCHMARKS / "devices-4x-wifi4.toml").jobs()
    assert [(j.world_size, j.speeds) for j in jobs] == [(2, (0.5,) * 2), (3, (0.5,) * 3), (4, (0.5,) * 4)]
    assert jobs[2].label == "vit-base-patch16-224 [0.5,0.5,0.5,0.5] wifi4"
    mixed = load_scenario(BENCHMARKS / "devices-mixed-wifi4.toml").jobs()
    assert mixed[0].speeds == (1.0, 0.4) and "equal_split" in mixed[0].strategies
    spec = JobSpec(mixed[0], "/p.json", {}, 50e6)
    assert JobSpec.from_json(spec.to_json()) == spec
    assert load_scenario(BENCHMARKS / "smoke.toml").jobs()[0].speeds == ()


def test_job_spec_round_trip():
    job = load_scenario(BENCHMARKS / "smoke.toml").jobs()[0]
    spec = JobSpec(job, "/p.json", {"git_sha": "abc"}, 50e6)
    assert JobSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("data, message", [
    ({"models": ["vit-tiny-test"], "links": ["wifi4"], "strategies": ["magic"]}, "unknown strategies"),
    ({"models": [{"name": "vit-tiny-test", "seq_len": 8}], "links": ["wifi4"]}, "image model"),
    ({"models": [{"name": "bert-tiny-test", "seq_len": 4096}], "links": ["wifi4"]}, "seq_len 4096"),
    ({"models": ["vit-tiny-test"], "links": ["carrier-pigeon"]}, "carrier-pigeon"),
    ({"models": ["vit-tiny-test"], "links": ["wifi4"], "world_sizes": [1]}, "world_sizes"),
    ({"models": ["vit-tiny-test"], "links": ["wifi4"], "repeat": 3}, "unknown scenario keys"),
    ({"models": ["vit-tiny-test"], "links": ["wifi4"], "device_speeds": [[0.4, 1.0]]}, "the fastest first"),
])
def test_bad_scenarios_name_the_value(data, message):
    with pytest.raises(ValueError, match=message):
        scenario_from_dict(data)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_scenario(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_scenario(bad)


def test_model_case_label():
    assert ModelCase("bert-base", 128).label == "bert-base@128"
    assert ModelCase("vit-tiny-test").label == "vit-tiny-test"


def test_pipeline_stages_and_microbatches():
    assert stage_layers(12, 2) == [(0, 6), (6, 12)]
    assert stage_layers(12, 5) == [(0, 3), (3, 6), (6, 8), (8, 10), (10, 12)]
    with pytest.raises(ValueError, match="2-layer"):
        stage_layers(2, 3)
    assert [microbatches(b, 4) for b in (1, 2, 3, 8, 32)] == [1, 2, 3, 4, 4]
    assert microbatches(6, 4) == 3


def test_host_facts_carry_versions_but_no_host_name():
    import platform

    from edgeprism.bench.runner import host_facts

    facts = host_facts()
    assert facts["torch_version"] and facts["num_cores"] >= 1 and "git_sha" in facts
    assert platform.node() not in {str(v) for v in facts.values()}
