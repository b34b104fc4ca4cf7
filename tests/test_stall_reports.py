"""A request that misses its deadline still teaches the speed estimate (issue 17: stragglers): each rank says how
far it got (runtime/stall_reports.py), sealed with its session key, and rank 0 folds the per-layer compute
rates in between requests."""

import dataclasses
import signal
import threading
import time

import pytest
from torch.distributed import HashStore

from edgeprism.partition.timeline import LayerTiming, Timeline
from edgeprism.plan.cost import rank_compute_s
from edgeprism.runtime import launch_local
from edgeprism.runtime.control import Session
from edgeprism.runtime.stall_reports import StallReport, progress_of, read_stall_reports, report_stall
from edgeprism.testbed.emulation import write_link_file
from edgeprism.testbed.presets import LinkPreset
from test_reliability import CONFIG, LARGE, _exact, _profile


def _timeline(*compute_s: float) -> Timeline:
    timeline = Timeline()
    timeline.layers = [LayerTiming(i, 0.001, 0.5, 0.25, s) for i, s in enumerate(compute_s)]
    return timeline


def test_a_report_round_trips_once_and_a_forged_one_is_refused():
    store = HashStore()
    sessions = {1: Session(1, 7, b"k" * 32), 2: Session(2, 9, b"q" * 32)}
    # encode + compute, never the waits
    assert progress_of(4, "r17", _timeline(0.2, 0.3)) == StallReport(4, "r17", 2, pytest.approx(0.502))
    report_stall(store, sessions[1], 4, "r17", _timeline(0.2, 0.3))
    forged = Session(2, 9, b"x" * 32)  # rank 2's slot, a key that is not its session's
    report_stall(store, forged, 4, "r17", _timeline(9.0))
    found = read_stall_reports(store, sessions)
    assert found == {1: StallReport(4, "r17", 2, pytest.approx(0.502))}
    assert read_stall_reports(store, sessions) == {}  # each report is read once


def test_a_rank_stopped_mid_request_reports_how_far_it_got_and_rank_0_learns_from_it(tmp_path, monkeypatch):
    """Rank 2 stops mid-request (SIGSTOP) and resumes after rank 0 gave up and answered locally: both workers'
    reports of the failed request (layers done, their compute seconds) reach the speed estimate beside rank 0's
    own. (Where a stop lands — in a layer's compute or in its wait — is timing; the speed a slowed device is
    learned at is measured by `scripts/bench_straggler.py` under a real CPU quota.)"""
    link_file = tmp_path / "link.json"
    write_link_file(link_file, LinkPreset("fast", rate_bps=1e9, delay_s=0.0, source="test"), "transport")
    config = dataclasses.replace(CONFIG, learn_speeds=True, learn_link=False)
    with launch_local(3, "vit-tiny-test", _profile(), config=config, link_file=link_file) as engine:
        for _ in range(3):  # the plan's first request pays set-up; the next ones are the baseline
            assert engine.infer(LARGE).metrics.plan["ranks"] == [0, 1, 2]
        plan = engine.plan_for(LARGE)
        # Stretch the next request (0.15 s per message) so that the stop lands in the middle of it.
        write_link_file(link_file, LinkPreset("slow", rate_bps=1e9, delay_s=0.15, source="test"), "transport")
        seen = []
        original = engine.speed_estimator.update

        def spy(ranks, predicted, measured, exclude=()):
            seen.append((tuple(ranks), tuple(predicted), tuple(measured)))
            original(ranks, predicted, measured, exclude)

        monkeypatch.setattr(engine.speed_estimator, "update", spy)
        stopper = threading.Timer(0.9, engine.workers.signal, (2, signal.SIGSTOP))
        stopper.start()
        try:
            result = engine.infer(LARGE, plan=plan)
            stopper.join()
            assert result.metrics.fallback and result.metrics.mode == "local"
            _exact(engine, LARGE, result)
            assert engine._stalled is not None  # rank 2 is still stopped: its report is awaited
        finally:
            engine.workers.signal(2, signal.SIGCONT)
        deadline = time.monotonic() + 20.0
        while engine._stalled is not None and time.monotonic() < deadline:
            time.sleep(0.3)
            engine.tick()
    assert engine._stalled is None, "the stopped rank's report never arrived"
    learned = [s for s in seen if s[0] == (0, 1, 2)]
    assert len(learned) == 1, seen  # the stalled request, learned once (no other request ran since)
    _, predicted, measured = learned[0]
    whole = rank_compute_s(engine.profile, LARGE["pixel_values"].shape[0], plan.token_counts,
                           engine.profile.codec(plan.codec))
    # every rank had finished some layers, not all: predictions are the whole request's x layers done / L
    assert all(0 < p < w for p, w in zip(predicted, whole)) and all(m > 0 for m in measured), (learned, whole)
