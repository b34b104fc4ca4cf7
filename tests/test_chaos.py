"""The chaos run's pure parts: the seeded fault schedule and the summary (no root, no processes).
The run itself: tests/test_chaos_testbed.py (root, slow)."""

import pytest

from edgeprism.bench.chaos import ChaosRunConfig, percentile, summarize, text_pool
from edgeprism.testbed.chaos import KINDS, ChaosConfig, schedule


def test_schedule_is_reproducible_and_seeded():
    config = ChaosConfig(seed=3, mean_gap_s=2.0)
    first = schedule(config, [1, 2, 3], horizon_s=600)
    assert first == schedule(ChaosConfig(seed=3, mean_gap_s=2.0), [1, 2, 3], horizon_s=600)
    assert first != schedule(ChaosConfig(seed=4, mean_gap_s=2.0), [1, 2, 3], horizon_s=600)
    assert {e.kind for e in first} == set(KINDS)  # 600 s at one fault per ~2 s draws every kind
    assert {e.host for e in first} == {1, 2, 3}  # never host 0, the coordinator's


def test_schedule_one_fault_per_host_at_a_time_within_the_horizon():
    config = ChaosConfig(seed=0, mean_gap_s=1.0, min_duration_s=2.0, max_duration_s=9.0, kinds=("kill", "cut"))
    events = schedule(config, [1, 2], horizon_s=300)
    assert events and all(0 < e.at_s < 300 and 2.0 <= e.duration_s <= 9.0 for e in events)
    assert {e.kind for e in events} == {"kill", "cut"}
    for host in (1, 2):
        mine = [e for e in events if e.host == host]
        assert all(a.at_s + a.duration_s <= b.at_s for a, b in zip(mine, mine[1:])), mine
    assert [e.at_s for e in events] == sorted(e.at_s for e in events)


def test_schedule_and_config_refuse_what_cannot_run():
    with pytest.raises(ValueError, match="at least one device"):
        schedule(ChaosConfig(), [], horizon_s=10)
    with pytest.raises(ValueError, match="reboot"):
        ChaosConfig(kinds=("kill", "reboot"))
    with pytest.raises(ValueError, match="max_duration_s 1"):
        ChaosConfig(min_duration_s=3.0, max_duration_s=1.0)
    with pytest.raises(ValueError, match="3 speeds"):
        ChaosRunConfig(hosts=4, speeds=(0.5, 0.5, 0.5))


def test_summary_counts_lost_mismatched_and_fallbacks():
    config = ChaosRunConfig(requests=5)
    rows = [
        {"ok": True, "status": 200, "attempts": 1, "latency_ms": 10.0, "cosine": 1.0, "mode": "distributed",
         "ranks": [0, 1], "fallback": False},
        {"ok": True, "status": 200, "attempts": 2, "latency_ms": 30.0, "cosine": 0.9999999, "mode": "local",
         "ranks": [0], "fallback": True},
        {"ok": True, "status": 200, "attempts": 1, "latency_ms": 20.0, "cosine": 0.99, "mode": "distributed",
         "ranks": [0, 1, 2], "fallback": False},
        {"ok": False, "status": 503, "attempts": 3, "latency_ms": 5000.0},
    ]  # and one request with no row at all (the client died): lost too
    summary = summarize(rows, config)
    assert summary["answered"] == 3 and summary["lost"] == 2 and summary["lost_statuses"] == {"503": 1}
    assert summary["mismatches"] == 1 and summary["min_cosine"] == 0.99
    assert summary["fallbacks"] == 1 and summary["retried"] == 2
    assert summary["modes"] == {"distributed x2": 1, "local x1": 1, "distributed x3": 1}
    assert summary["latency_ms"]["p50"] == 20.0 and summary["latency_ms"]["p100"] == 30.0


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0 and percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0


def test_text_pool_is_seeded():
    pool = text_pool(6, (4, 10), seed=1)
    assert pool == text_pool(6, (4, 10), seed=1) and pool != text_pool(6, (4, 10), seed=2)
    assert all(4 <= len(text.split()) <= 10 for text in pool)
