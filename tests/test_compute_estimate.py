"""The per-device compute speed estimate: a device slowed mid-run is noticed from its timings, the planner
stops waiting on it within a few requests, and it is taken back once restored."""

import pytest

from edgeprism.plan import Limits, LinkEstimate, Request, choose_plan, predict
from edgeprism.plan.cost import rank_compute_s
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.runtime.compute_estimate import ComputeSpeedEstimator

ANY_CODEC = Limits(None, allow_unmeasured_codecs=True)
"""Opt in to the synthetic profile's lossy codecs: these tests are about shares and speeds (issue 16: faithful by
default)."""

MODEL = "vit-base-patch16-224"


def _serve(profile, estimator, request, true_scale, requests):
    """Plan and 'run' `requests` requests on devices whose real speed is the profile's x `true_scale`:
    each plan rank's measured compute is the cost model's at its real speed. Returns the plans."""
    plans = []
    for _ in range(requests):
        link = LinkEstimate(profile.link.bandwidth_bps, profile.link.latency_s,
                            device_speed_scale=estimator.scales())
        plan = choose_plan(profile, request, link, limits=ANY_CODEC)
        plans.append(plan)
        if plan.mode == "local":
            estimator.update((), (), ())
            continue
        unit = rank_compute_s(profile, request.batch, plan.token_counts, profile.codec(plan.codec))
        measured = [u / (profile.device_speeds[r] * true_scale[r]) for u, r in zip(unit, plan.ranks)]
        estimator.update(plan.ranks, unit, measured)
    return plans


def test_a_straggler_is_dropped_within_5_requests_and_taken_back_when_restored():
    profile = synthetic_profile(world_size=4, device_speeds=(0.5, 0.5, 0.5, 0.5))
    request = Request(MODEL, 8, 197)
    estimator = ComputeSpeedEstimator(4)
    normal = (1.0, 1.0, 1.0, 1.0)
    plans = _serve(profile, estimator, request, normal, 3)
    assert all(p.ranks == (0, 1, 2, 3) for p in plans) and estimator.scales() is None
    slowed = (1.0, 1.0, 0.25, 1.0)  # rank 2 at a quarter of its speed
    truth = LinkEstimate(profile.link.bandwidth_bps, profile.link.latency_s, device_speed_scale=slowed)
    best_s = choose_plan(profile, request, truth, limits=ANY_CODEC).predicted_latency_s  # knowing the slowdown
    naive_s = predict(profile, request, plans[-1], truth).total_s  # the old plan, on the slowed devices
    assert naive_s > 1.5 * best_s  # waiting on the straggler costs
    plans = _serve(profile, estimator, request, slowed, 5)
    assert estimator.scale(2) == pytest.approx(0.25)
    # from the request after the first slow one, the plan no longer waits on it: within 5 % of the best
    assert all(predict(profile, request, p, truth).total_s <= 1.05 * best_s for p in plans[1:])
    # restored: after `retry_after` requests it is tried at its baseline again, and kept
    plans = _serve(profile, estimator, request, normal, estimator.retry_after + 3)
    assert plans[-1].ranks == (0, 1, 2, 3) and estimator.scales() is None


def test_a_still_slow_device_is_dropped_again_after_its_retry():
    profile = synthetic_profile(world_size=3, device_speeds=(1.0, 1.0, 1.0))
    request = Request(MODEL, 8, 197)
    estimator = ComputeSpeedEstimator(3, retry_after=3)
    _serve(profile, estimator, request, (1.0, 1.0, 1.0), 2)
    plans = _serve(profile, estimator, request, (1.0, 0.02, 1.0), 12)
    with_it = [p for p in plans if 1 in p.ranks]
    assert 1 <= len(with_it) <= 4  # the first slow request, then one retry every few requests
    assert not any(1 in a.ranks and 1 in b.ranks for a, b in zip(plans, plans[1:]))  # each retry: dropped again


def test_small_noise_does_not_move_the_scales_and_bad_arguments_are_errors():
    estimator = ComputeSpeedEstimator(2)
    for noise in (1.0, 1.05, 0.95, 1.08, 0.93):
        estimator.update((0, 1), (1.0, 1.0), (noise, 1.0 / noise))
    assert estimator.scales() is None
    estimator.update((0, 1), (1.0, 1.0), (1e-4, 1.0))  # too short to judge: ignored
    assert estimator.scales() is None
    with pytest.raises(ValueError, match="change_factor"):
        ComputeSpeedEstimator(2, change_factor=1.0)
