"""The demo over devices of different speeds: equal_split, fast_alone and share sweeps in the oracle."""

import json
import shutil

import pytest

from edgeprism.bench import tables
from edgeprism.bench.demo import DemoSpec, add_oracle, every_token_codecs, phase_strategies, ratios, summarize
from edgeprism.bench.demo_devices import (
    add_fast_alone,
    codec_class,
    device_codecs,
    device_plan,
    share_sweep,
    world_sizes,
)
from edgeprism.cli.main import main
from edgeprism.plan import Limits, LinkEstimate, Request
from edgeprism.plan.synthetic import synthetic_profile
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


def test_world_sizes_in_the_oracle_and_faithful_codecs_only():
    spec = DemoSpec(speeds=(0.5, 0.5, 0.5, 0.5))
    assert world_sizes(4) == ("world:2", "world:3") and world_sizes(2) == ()
    assert phase_strategies(spec, 0)[-3:] == ("equal_split", "world:2", "world:3")
    profile = synthetic_profile(world_size=4, device_speeds=(0.5, 0.5, 0.5, 0.5))
    allowed = device_codecs(profile, (), spec.speeds)
    assert allowed and all(c.cr == 1 for c in profile.codecs if c.codec in allowed)
    assert any(c.cr > 1 for c in profile.codecs) and "fp16" in allowed  # Segment Means is out, lossless in
    assert device_codecs(profile, (), ()) is None and device_codecs(profile, ("fp16",), spec.speeds) == ("fp16",)
    with pytest.raises(ValueError, match="not in the profile"):
        device_codecs(profile, ("nope",), spec.speeds)
    limits = Limits(allow_unmeasured_codecs=True, codecs=allowed)
    link = LinkEstimate(profile.link.bandwidth_bps, profile.link.latency_s)
    request = Request("vit-base-patch16-224", 8, 197)
    plans = {s: device_plan(profile, request, link, s, "latency", limits)
             for s in ("world:2", "world:3", "equal_split")}
    assert [p.ranks for p in plans.values()] == [(0, 1), (0, 1, 2), (0, 1, 2, 3)]
    assert all(p.cr == 1 for p in plans.values()) and plans["equal_split"].token_counts == (50, 49, 49, 49)
    assert device_plan(profile, request, link, "world:2", "latency", Limits(codecs=("sm16",))) is None
    assert codec_class({"mode": "local"}, 0.0, 0.01) == "exact"
    assert codec_class({"mode": "distributed", "codec": "bf16", "cr": 1}, 0.0, 0.01) == "lossless"
    assert codec_class({"mode": "distributed", "codec": "int8", "cr": 1}, None, 0.01) == "unmeasured (opted in)"
    assert codec_class({"mode": "distributed", "codec": "sm16", "cr": 16}, None, 0.01).startswith("segment-means")
    assert codec_class({"mode": "distributed", "codec": "int8", "cr": 1}, 0.02, 0.01) == "measured over budget"
    # the oracle is the best over every world size: here 3 devices
    rows = [_row("local", 7.0), _row("equal_split", 4.0), _row("world:2", 4.5), _row("world:3", 3.5),
            _row("segment_means", 2.0), _row("adaptive", 3.6)]
    rows[-2]["fidelity_loss"] = None  # the Segment Means baseline: unmeasured, never the target
    gains = ratios(summarize(add_oracle(rows)))[0]
    assert gains["oracle_plan"].startswith("world:3") and gains["adaptive_over_oracle"] == pytest.approx(3.6 / 3.5)


def test_an_opted_in_run_holds_the_oracle_to_the_adaptive_plans_codecs():
    # --allow-unmeasured-codecs --codecs fp16,int8: adaptive may pick int8 of unmeasured fidelity, so the static
    # int8 split is a target too (it was left out, and adaptive "beat" an oracle of lossless plans: 0.80x);
    # Segment Means, which the allow-list keeps from adaptive, is still no target
    rows = [_row("local", 6.6), _row("equal_split", 4.07), _row("world:2", 5.3), _row("segment_means", 2.9),
            _row("adaptive", 4.24)]
    for row, codec in zip(rows, ("", "int8", "fp16", "sm16", "int8")):
        row["codec"] = codec
        row["fidelity_loss"] = None if codec in ("int8", "sm16") else 0.0
    assert every_token_codecs(rows) == ("fp16", "int8")
    lossless_only = ratios(summarize(add_oracle(rows)))[0]
    assert lossless_only["oracle_plan"].startswith("world:2")
    opted_in = ratios(summarize(add_oracle(rows, allow_unmeasured_codecs=True, codecs=("fp16", "int8"))))[0]
    assert opted_in["oracle_plan"].startswith("equal_split")
    assert opted_in["adaptive_over_oracle"] == pytest.approx(4.24 / 4.07)
    any_codec = ratios(summarize(add_oracle(rows, allow_unmeasured_codecs=True)))[0]
    assert any_codec["oracle_plan"].startswith("segment_means")


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


def test_bench_tables_world_oracle_spans_world_sizes_of_the_same_devices():
    def row(world, strategy, latency_s, speeds=0.5):
        return {"model_case": "vit-base-patch16-224", "world_size": world, "link": "wifi4", "batch": 8,
                "strategy": strategy, "latency_s": latency_s, "energy_j": latency_s, "energy_source": "modelled",
                "plan": strategy, "bytes_exchanged": 0, "skipped": False, "device_speeds": [speeds] * world,
                "fidelity_loss": 0.0}

    rows = [row(2, "local", 7.0), row(2, "equal_split", 3.0), row(2, "adaptive", 3.1),
            row(4, "local", 7.2), row(4, "equal_split", 4.0), row(4, "adaptive", 3.2),
            row(3, "equal_split", 1.0, speeds=0.9)]  # other devices: never this point's oracle
    summary = tables.add_world_oracle(tables.add_oracle(tables.summarize(rows)))
    four = next(r for r in tables.ratios(summary) if r["world_size"] == 4)
    assert four["adaptive_over_oracle"] == pytest.approx(3.2 / 4.0)  # the oracle at 4 devices only
    assert four["adaptive_over_world_oracle"] == pytest.approx(3.2 / 3.0)  # 2 of the same devices did better
    assert four["world_oracle_plan"].startswith("equal_split x2")
    goal = next(g for g in tables.goals(tables.ratios(summary)) if "world sizes" in g["goal"])
    assert not goal["met"] and goal["points"] == 2
    # two pairs of other speeds are two points, not one
    pairs = [{**row(2, s, t), "device_speeds": list(speeds)} for speeds in ((1.0, 0.4), (1.0, 0.7))
             for s, t in (("local", 3.0), ("adaptive", 2.5))]
    entries = tables.ratios(tables.add_oracle(tables.summarize(pairs)))
    assert sorted(e["device_speeds"] for e in entries) == [[1.0, 0.4], [1.0, 0.7]]
