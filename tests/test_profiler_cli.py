"""`edgeprism profile`: clear errors for bad input and bad profiles; one real end-to-end run (slow)."""

from __future__ import annotations

import dataclasses
import json

import pytest

import edgeprism.cli.main as cli_main
from edgeprism.plan.synthetic import synthetic_profile


@pytest.fixture
def edgeprism(monkeypatch):
    """`edgeprism ...` in-process, with the profile command registered (whether or not main lists it yet)."""
    if "profile" not in cli_main.COMMAND_MODULES:
        monkeypatch.setattr(cli_main, "COMMAND_MODULES", (*cli_main.COMMAND_MODULES, "profile"))
    return cli_main.main


@pytest.fixture
def profile_path(tmp_path):
    path = tmp_path / "vit.json"
    synthetic_profile("vit-base-patch16-224", world_size=2).save(path)
    return path


def test_check_accepts_a_matching_profile(edgeprism, profile_path, capsys):
    assert edgeprism(["profile", "--model", "vit-base-patch16-224", "--world-size", "2", "--check",
                      str(profile_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and len(out["profile_hash"]) == 16


def _corrupt(path):
    path.write_text("{not json")


def _truncated(path):
    path.write_text(path.read_text()[:200])


def _old_version(path):
    data = json.loads(path.read_text())
    data["schema_version"] = 0
    path.write_text(json.dumps(data))


def _not_an_object(path):
    path.write_text("[1, 2, 3]")


@pytest.mark.parametrize("damage, match", [
    (_corrupt, "not valid JSON"),
    (_truncated, "corrupt or truncated"),
    (_old_version, "schema_version 0 is not supported"),
    (_not_an_object, "a profile is a JSON object"),
])
def test_check_refuses_damaged_profiles_with_a_clear_error(edgeprism, profile_path, capsys, damage, match):
    damage(profile_path)
    assert edgeprism(["profile", "--model", "vit-base-patch16-224", "--check", str(profile_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeprism profile: error:") and match in err and str(profile_path) in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, match", [
    (["--model", "bert-base", "--world-size", "2"], "was made for model vit-base-patch16-224, not bert-base"),
    (["--model", "vit-base-patch16-224", "--world-size", "3"], "was made for world size 2, not 3"),
])
def test_check_refuses_a_profile_for_another_model_or_world_size(edgeprism, profile_path, capsys, argv, match):
    assert edgeprism(["profile", *argv, "--check", str(profile_path)]) == 2
    assert match in capsys.readouterr().err


def test_check_refuses_another_architecture_under_the_same_name(edgeprism, tmp_path, capsys):
    profile = synthetic_profile("vit-base-patch16-224")
    model = dataclasses.replace(profile.model, num_layers=6)
    other = dataclasses.replace(profile, model=model, config_hash=model.config_hash())
    path = tmp_path / "six.json"
    other.save(path)
    assert edgeprism(["profile", "--model", "vit-base-patch16-224", "--check", str(path)]) == 2
    assert "another vit-base-patch16-224 architecture" in capsys.readouterr().err


def test_missing_profile_file(edgeprism, tmp_path, capsys):
    assert edgeprism(["profile", "--model", "vit-tiny-test", "--check", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--model", "vit-tiny-test"], "give --out FILE"),
    (["--model", "vit-tiny-test", "--out", "x.json", "--world-size", "1"], "at least 2 ranks"),
    (["--model", "no-such-model", "--out", "x.json"], "unknown model 'no-such-model'"),
    (["--model", "vit-tiny-test", "--out", "x.json", "--link", "wifi9"], "unknown link preset 'wifi9'"),
    (["--model", "vit-tiny-test", "--out", "x.json", "--codecs", "fp32,sm0"], "sm0"),
    (["--model", "vit-tiny-test", "--out", "x.json", "--fidelity", "/nonexistent.jsonl"], "does not exist"),
    (["--model", "vit-tiny-test", "--out", "x.json", "--fidelity", "f.jsonl", "--no-eval"], "contradict"),
])
def test_user_mistakes_are_one_line_errors_before_anything_runs(edgeprism, tmp_path, monkeypatch, capsys, argv,
                                                                 match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.jsonl").write_text('{"codec": "sm4", "metric": "m", "value": 1, "reference_value": 1}\n')
    assert edgeprism(["profile", *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


def test_a_bad_batch_list_is_an_argparse_error(edgeprism, capsys):
    with pytest.raises(SystemExit) as exit_info:
        edgeprism(["profile", "--model", "vit-tiny-test", "--out", "x.json", "--batches", "1,two"])
    assert exit_info.value.code == 2 and "comma-separated whole numbers" in capsys.readouterr().err


@pytest.mark.slow
def test_profile_and_validate_end_to_end_over_an_emulated_link(edgeprism, tmp_path, capsys):
    """Real worker processes: the link test and the validation runs over a transport-emulated link."""
    out_path = tmp_path / "tiny.json"
    assert edgeprism(["profile", "--model", "vit-tiny-test", "--world-size", "2", "--link", "lan",
                      "--link-backend", "loopback", "--batches", "1,2,4", "--repeats", "1", "--no-eval",
                      "--codecs", "fp32,int8,sm4a+int8", "--out", str(out_path), "--validate",
                      "--validate-batches", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("profile_seconds", "median_rel_error", "max_rel_error"):
        assert isinstance(out[key], float) and out[key] >= 0
    assert [p["mode"] for p in out["points"]] == ["distributed", "distributed", "local"]
    assert "loopback-transport" in out["link"]
    assert edgeprism(["profile", "--model", "vit-tiny-test", "--world-size", "2", "--check", str(out_path)]) == 0
