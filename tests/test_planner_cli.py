"""`edgeprism plan`: the table, the JSON, and clear errors."""

from __future__ import annotations

import argparse
import json

import pytest

from edgeprism.cli import plan as plan_cli
from edgeprism.plan.synthetic import synthetic_profile


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgeprism")
    plan_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", *argv])
    return args.handler(args)


@pytest.fixture
def profile_path(tmp_path):
    path = tmp_path / "vit.json"
    synthetic_profile(world_size=3, device_speeds=(1.0, 0.8, 1.2)).save(path)
    return path


def test_table_shows_candidates_exclusions_and_winner(profile_path, capsys):
    assert _run(["--profile", str(profile_path), "--batch", "8", "--max-fidelity-loss", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "WINNER" in out and "excluded codecs:" in out
    assert "int4: fidelity not measured" in out and "sm16+int8: top1_agreement loss 60.00% exceeds" in out
    assert out.strip().splitlines()[-1].startswith("Plan[")


def test_json_output_parses_and_names_the_plan(profile_path, capsys):
    assert _run(["--profile", str(profile_path), "--image-size", "224", "--objective", "energy",
                 "--bandwidth-bps", "1e8", "--latency-s", "0.001", "--healthy-ranks", "0,2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["request"]["num_tokens"] == 197 and out["objective"] == "energy"
    assert out["link"] == {"bandwidth_bps": 1e8, "latency_s": 0.001, "healthy_ranks": [0, 2]}
    assert all(1 not in c["plan"]["ranks"] for c in out["candidates"])
    assert out["plan"]["mode"] in ("local", "distributed") and out["plan"]["reason"]


def test_synthetic_profile_needs_no_file(capsys):
    assert _run(["--synthetic", "bert-base", "--tokens", "128", "--world-size", "2"]) == 0
    assert "bert-base" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--max-fidelity-loss", "2"], r"max_fidelity_loss must be in \[0, 1\]"),
    (["--world-size", "4"], "made for world size 3, not 4"),
    (["--image-size", "200"], "not a multiple of"),
    (["--healthy-ranks", "0,7"], "outside world size 3"),
    (["--batch", "0"], "batch must be >= 1"),
])
def test_user_mistakes_are_value_errors(profile_path, argv, message):
    with pytest.raises(ValueError, match=message):
        _run(["--profile", str(profile_path), *argv])


def test_bad_profile_file_is_a_value_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1, "model": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        _run(["--profile", str(bad)])
    with pytest.raises(ValueError, match="text model: give --tokens"):
        _run(["--synthetic", "bert-base"])
