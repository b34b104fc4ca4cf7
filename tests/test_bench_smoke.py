"""The smoke scenario end to end: testbed, every strategy on the same 2 ranks, rows, tables, plots."""

import argparse
import json
from pathlib import Path

import pytest

from edgeprism.bench.scenarios import STRATEGIES

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
EXACT = ("local", "transformers", "full_exchange", "pipeline", "tensor_parallel")


def _bench(argv):
    from edgeprism.cli import bench

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", *argv])
    return args.handler(args)


def test_smoke_scenario_writes_rows_tables_and_plots(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert _bench(["--scenario", str(BENCHMARKS / "smoke.toml"), "--out", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    strategies = {r["strategy"] for r in rows}
    # smoke.toml lists every strategy but equal_split (mixed devices only)
    assert strategies == {s for s in STRATEGIES if s not in ("segment_means", "equal_split")} | {"segment_means:sm4"}
    assert len(rows) == 2 * 2 * len(strategies)  # batches x repeats x strategies
    for row in rows:
        for key in ("latency_s", "energy_j", "energy_source", "plan", "profile_hash", "git_sha", "torch_version",
                    "cpu_model", "num_cores", "emulation", "world_size", "batch", "scenario"):
            assert key in row, key
        assert row["latency_s"] > 0 and row["energy_source"] == "modelled"
        if row["strategy"] in EXACT:
            assert row["max_abs_diff_vs_local"] <= 1e-4, row
            assert row["fidelity_loss"] == 0.0, row
        if row["strategy"] == "segment_means:sm4":
            assert row["fidelity_loss"] != 0.0, row  # lossy, and labelled with the profile's (synthetic) loss
        if row["strategy"] == "adaptive":  # faithful by default: within 1 %, no unmeasured codec unasked
            assert row["fidelity_loss"] is not None and row["fidelity_loss"] <= 0.01, row
        # every engine request ran as planned: none failed over to a local rerun (switching to and from a
        # peer strategy must keep the engine's lanes)
        assert not row.get("fallback"), row
    static = [r for r in rows if r["strategy"] in ("full_exchange", "segment_means:sm4")]
    assert static and all(r["mode"] == "distributed" for r in static)
    assert {r["batch"] for r in report["ratios"]} == {1, 2}
    assert "adaptive_over_oracle" in report["ratios"][0] and "adaptive_over_pipeline" in report["ratios"][0]
    assert (tmp_path / "tables.md").read_text().startswith("# Benchmark: smoke")
    # Tables redraw from rows alone.
    assert _bench(["--from-rows", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "again"), "--no-plots"]) == 0
    assert (tmp_path / "again" / "tables.md").exists()


@pytest.mark.slow
@pytest.mark.timeout(24 * 3600)
@pytest.mark.parametrize("scenario", ["vit-s-wifi4", "full"])
def test_measured_scenarios(scenario, tmp_path, capsys):
    """The measured scenarios (about 15 min and 15 h here): they run to the end and every goal is checked."""
    pytest.importorskip("transformers")
    assert _bench(["--scenario", str(BENCHMARKS / f"{scenario}.toml"), "--out", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ratios"] and all(goal["points"] for goal in report["goals"][:2])
