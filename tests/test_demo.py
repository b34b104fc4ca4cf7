"""The demo end to end on a tiny model: every strategy per batch, the oracle, the report files."""

import json

import pytest

from edgeprism.cli.demo import host_load
from edgeprism.cli.main import main


def test_demo_json_rows_and_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGEPRISM_HOME", str(tmp_path / "home"))
    out = tmp_path / "report"
    code = main(["demo", "--model", "vit-tiny-test", "--batches", "1,2", "--links", "wifi4,lan",
                 "--backend", "loopback", "--out", str(out), "--repeats", "2", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    strategies = {(r["link"], r["batch"], r["strategy"]) for r in report["rows"]}
    for link in ("wifi4", "lan"):
        for batch in (1, 2):
            for strategy in ("local", "segment_means", "adaptive", "oracle"):
                assert (link, batch, strategy) in strategies
            # static full exchange runs on the first link only (on a sagging link it takes minutes)
            assert ((link, batch, "full_exchange") in strategies) == (link == "wifi4")
    row = report["rows"][0]
    for key in ("batch", "strategy", "latency_s", "energy_j", "energy_source", "plan"):
        assert key in row
    assert {r["energy_source"] for r in report["rows"]} == {"modelled"}
    assert report["emulation"] == "loopback-transport"
    full = [r for r in report["rows"] if r["strategy"] == "full_exchange"]
    # batch 1 runs unsliced; batch 2 as 2 micro-batches (plan/micro.py)
    assert sorted({(r["batch"], r["plan"]) for r in full}) == [(1, "fp32 x2"), (2, "fp32 x2 mb2")]
    assert (out / "summary.md").exists() and (out / "rows.jsonl").exists()
    # Faithful by default (issue 16): random weights measure no fidelity, so the adaptive engine may use only
    # lossless codecs; the forced Segment Means baseline is labelled unmeasured, exact plans 0.
    loss = {r["strategy"]: {x["fidelity_loss"] for x in report["rows"] if x["strategy"] == r["strategy"]}
            for r in report["rows"]}
    assert loss["local"] == loss["full_exchange"] == {0.0} and loss["segment_means"] == {None}
    assert loss["adaptive"] == {0.0}, loss
    assert "unmeasured" in report["fidelity"] and "segment_means" in report["fidelity"]
    assert "fidelity loss" in (out / "summary.md").read_text()
    # Two interleaved rounds per point, with their spread; the host's load is reported beside the numbers.
    assert all(r["latency_p25_s"] <= r["latency_p75_s"] for r in report["rows"])
    assert all(r["n"] == 2 for r in report["rows"] if r["strategy"] != "oracle")  # the oracle: one chosen row
    assert "load average" in report["host_load"] and report["data"] == "synthetic"
    raw = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    split = [r for r in raw if r["mode"] == "distributed"]
    assert split and all(len(r["timeline"]) == 2 and r["limit_s"] > 0 for r in split)  # vit-tiny-test: 2 layers
    assert all(r["achieved_over_limit"] > 0 and r["sequential_limit_s"] >= r["limit_s"] for r in raw)


@pytest.mark.slow
def test_real_weights_demo_reports_probe_accuracy_and_stays_faithful(tmp_path, capsys):
    """`make demo`'s default: DINOv2-S/14 with its real weights on Fashion-MNIST at 224 px (needs `make assets`;
    the first run fits the probe and measures every codec's fidelity, minutes on a busy host)."""
    from edgeprism import assets

    try:
        assets.dinov2_checkpoint_dir()
    except assets.AssetMissingError as err:
        pytest.skip(f"real weights not prepared: {err}")
    code = main(["demo", "--batches", "1,4", "--links", "wifi4", "--repeats", "1", "--out", str(tmp_path), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "dinov2-s14" and report["data"] == "fashion-mnist" and report["image_size"] == 224
    assert set(report["probe_accuracy"]) >= {"local", "full_exchange", "segment_means", "adaptive"}
    assert report["probe_accuracy"]["local"] == report["probe_accuracy"]["full_exchange"]  # exact
    adaptive = [r for r in report["rows"] if r["strategy"] == "adaptive"]
    assert adaptive and all(r["fidelity_loss"] is not None and r["fidelity_loss"] <= 0.01 for r in adaptive)


def test_host_load_counts_the_emulated_devices_as_the_runs_own_load(monkeypatch):
    """4 devices on 2 cores leave a load of ~4 after the run: the run's own, not other work; a load beyond the cores
    before the run, or beyond the cores plus the devices after it, is."""
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert "BUSY" not in host_load(0.7, 4.2, devices=4)
    assert "BUSY" in host_load(0.7, 6.5, devices=4)
    assert "BUSY" in host_load(2.5, 1.0, devices=4)
    assert "BUSY" in host_load(0.5, 2.5)  # without devices: every process counts
