"""The demo over devices of different speeds: equal_split, fast_alone and share sweeps in the oracle."""

import json
import shutil

import pytest

from edgeprism.bench.demo import DemoSpec, add_fast_alone, add_oracle, phase_strategies, ratios, share_sweep, summarize
from edgeprism.cli.main import main
from edgeprism.testbed import cpu


def _row(strategy, latency_s, plan="p"):
    return {"phase": 0, "link": "wifi4", "batch": 8, "repeat": 0, "strategy": strategy, "latency_s": latency_s,
            "energy_j": latency_s, "energy_source": "modelled", "plan": plan, "predicted_latency_s": latency_s}


def test_strategies_sweep_fast_alone_and_oracle_over_splits():
    assert share_sweep(2, 0.25) == ("split:25/75", "split:50/50", "split:75/25")
    assert len(share_sweep(3, 0.05)) == 171 and share_sweep(2, 0.0) == ()
    spec = DemoSpec(speeds=(1.0, 0.4), share_step=0.5)
    assert phase_strategies(spec, 0)[-2:] == ("equal_split", "split:50/50")
    assert "equal_split" not in phase_strategies(DemoSpec(), 0)
    rows = [_row("local", 3.0), _row("segment_means", 2.5), _row("equal_split", 2.4), _row("split:70/30", 1.9),
            _row("adaptive", 2.0)]
    rows = add_oracle(add_fast_alone(rows, (1.0, 0.4)))
    fast = [r for r in rows if r["strategy"] == "fast_alone"]
    assert len(fast) == 1 and fast[0]["latency_s"] == 3.0 and "the fastest" in fast[0]["plan"]
    oracle = next(r for r in rows if r["strategy"] == "oracle")
    assert oracle["latency_s"] == 1.9 and oracle["plan"].startswith("split:70/30")
    gains = ratios(summarize(rows))[0]
    assert gains["adaptive_over_equal_split"] == pytest.approx(2.0 / 2.4)
    assert gains["adaptive_over_oracle"] == pytest.approx(2.0 / 1.9)


def test_speeds_must_put_the_fastest_first(tmp_path, capsys):
    assert main(["demo", "--model", "vit-tiny-test", "--speeds", "0.4,1.0", "--out", str(tmp_path)]) == 2
    assert "put the fastest device first" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(shutil.which("ip") is None or cpu.quota_missing() is not None, reason="needs ip and cgroups")
def test_demo_with_speeds_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGEPRISM_HOME", str(tmp_path / "home"))
    code = main(["demo", "--model", "vit-tiny-test", "--speeds", "1.0,0.4", "--batches", "2", "--links", "wifi4",
                 "--share-step", "0.25", "--backend", "netns", "--out", str(tmp_path / "report"), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["world_size"] == 2 and report["speeds"] == [1.0, 0.4]
    strategies = {r["strategy"] for r in report["rows"]}
    assert {"local", "fast_alone", "equal_split", "adaptive", "oracle", "split:75/25"} <= strategies
    assert "adaptive_over_equal_split" in report["ratios"][0]
