"""Tables are drawn from rows only: medians and spread, the hindsight oracle, ratios, goals, markdown."""

import pytest

from edgeprism.bench import tables


def _row(strategy, latency_s, batch=1, energy_j=None, plan=None, link="wifi4", model="vit-base-patch16-224"):
    return {"model_case": model, "world_size": 2, "link": link, "batch": batch, "strategy": strategy,
            "latency_s": latency_s, "energy_j": energy_j if energy_j is not None else 2 * latency_s,
            "energy_source": "modelled", "plan": plan or strategy, "bytes_exchanged": 0, "skipped": False,
            "emulation": "netns+tbf", "max_abs_diff_vs_local": 0.0}


def _rows():
    rows = []
    for latency in (1.0, 1.2, 1.1):
        rows += [_row("local", latency), _row("transformers", latency * 0.99), _row("full_exchange", latency * 5),
                 {**_row("segment_means:sm16", latency * 0.8, plan="sm16 x2"), "fidelity_loss": 0.005},
                 _row("pipeline", latency * 1.1),
                 _row("adaptive", latency * 0.82, plan="sm16 x2")]
    rows.append({**_row("tensor_parallel", 0.0), "skipped": True, "latency_s": None, "energy_j": None,
                 "latency_lower_bound_s": 50.0, "reason": "wire time"})
    return rows


def test_percentile_matches_numpy_linear():
    assert tables.percentile([1.0, 2.0, 3.0, 4.0], 0.25) == pytest.approx(1.75)
    assert tables.percentile([5.0], 0.75) == 5.0


def test_summary_oracle_and_ratios():
    summary = tables.add_oracle(tables.summarize(_rows()))
    by = {r["strategy"]: r for r in summary}
    assert by["local"]["latency_median_s"] == pytest.approx(1.1)
    assert by["local"]["latency_p25_s"] == pytest.approx(1.05) and by["local"]["latency_p75_s"] == pytest.approx(1.15)
    assert by["oracle"]["oracle_of"] == "segment_means:sm16"  # transformers and pipeline are peers, not statics
    assert by["tensor_parallel"]["skipped"]
    (entry,) = tables.ratios(summary)
    assert entry["adaptive_over_oracle"] == pytest.approx(0.82 / 0.8)
    assert entry["best_peer"] == "transformers"
    assert entry["adaptive_over_best_peer"] == pytest.approx(0.82 / 0.99)
    assert entry["adaptive_over_tensor_parallel"] == pytest.approx(1.1 * 0.82 / 50.0)
    assert entry["ratio_is_upper_bound"] == ["tensor_parallel"]
    assert entry["latency_reduction_vs_full"] == pytest.approx(1 - 0.82 / 5)
    assert entry["local_over_transformers"] == pytest.approx(1 / 0.99)


def test_the_oracle_is_held_to_the_fidelity_budget_too():
    lossy = [{**r, "fidelity_loss": 0.14} if r["strategy"].startswith("segment_means") else r for r in _rows()]
    unmeasured = [{**r, "fidelity_loss": None} if r["strategy"].startswith("segment_means") else r for r in _rows()]
    for rows in (lossy, unmeasured):
        by = {r["strategy"]: r for r in tables.add_oracle(tables.summarize(rows))}
        assert by["oracle"]["oracle_of"] == "local", by["oracle"]  # sm16 is faster, but not faithful
    by = {r["strategy"]: r for r in tables.add_oracle(tables.summarize(lossy), max_fidelity_loss=0.2)}
    assert by["oracle"]["oracle_of"] == "segment_means:sm16"


def test_goals_list_every_miss_and_markdown_says_so():
    summary = tables.add_oracle(tables.summarize(_rows()))
    checks = {c["goal"]: c for c in tables.goals(tables.ratios(summary))}
    assert checks["adaptive <= 1.05 x oracle"]["met"]
    assert checks["adaptive <= 1.00 x best peer"]["met"]
    assert checks[">= 77 % less latency than full exchange (ViT-B/16, wifi4)"]["met"]
    local = checks["local path <= 1.03 x plain transformers"]
    assert local["met"]
    slow = [{**r, "latency_s": r["latency_s"] * 2} if r["strategy"] == "adaptive" else r for r in _rows()]
    summary = tables.add_oracle(tables.summarize(slow))
    table = tables.ratios(summary)
    checks = tables.goals(table)
    missed = {c["goal"]: c for c in checks}["adaptive <= 1.05 x oracle"]
    assert not missed["met"] and missed["misses"][0][0] == "vit-base-patch16-224 x2 wifi4 batch 1"
    text = tables.markdown(summary, table, checks, "edgeprism bench --scenario x.toml", {"scenario": "x"})
    assert "MISSED" in text and "missed at vit-base-patch16-224 x2 wifi4 batch 1" in text
    assert "≤" in text and "(skipped)" in text and "edgeprism bench --scenario x.toml" in text


def test_unsupported_peer_is_left_out_of_ratios():
    rows = [r for r in _rows() if r["strategy"] != "tensor_parallel"]
    rows.append({**_row("tensor_parallel", 0.0), "skipped": True, "latency_s": None, "energy_j": None,
                 "latency_lower_bound_s": None, "reason": "unsupported for this model and world size"})
    summary = tables.add_oracle(tables.summarize(rows))
    (entry,) = tables.ratios(summary)
    assert "adaptive_over_tensor_parallel" not in entry and entry["ratio_is_upper_bound"] == []
    assert "not run" in tables.markdown(summary, [entry], tables.goals([entry]), "cmd", {})


def test_local_over_transformers_is_a_median_of_paired_rounds():
    rows = []
    for repeat, (local, plain) in enumerate([(1.0, 1.0), (3.0, 2.9), (2.0, 2.1)]):  # the machine drifts
        rows += [{**_row("local", local), "repeat": repeat}, {**_row("transformers", plain), "repeat": repeat}]
    summary = tables.add_oracle(tables.summarize(rows))
    (entry,) = tables.ratios(summary, rows)
    assert entry["local_over_transformers"] == pytest.approx(1.0)
    assert entry["local_over_transformers_p75"] == pytest.approx((1.0 + 3.0 / 2.9) / 2)
    assert "adaptive_over_oracle" not in entry
    assert "| 1.000 |" in tables.markdown(summary, [entry], tables.goals([entry]), "cmd", {})
