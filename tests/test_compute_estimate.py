"""The per-device compute speed estimate: a device slowed mid-run is noticed from its timings (relative to rank 0
in the same request, confirmed over `confirm` requests), the planner stops waiting on it within a few requests,
it is taken back once restored, and neither a busy host nor a lone outlier nor a decoder's decode moves it."""

import pytest
import torch

from edgeprism.models.config import get_config
from edgeprism.plan import Limits, LinkEstimate, Request, choose_plan, predict
from edgeprism.plan.cost import rank_compute_s
from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile
from edgeprism.runtime import EngineConfig, launch_local
from edgeprism.runtime.compute_estimate import ComputeSpeedEstimator

ANY_CODEC = Limits(None, allow_unmeasured_codecs=True)
"""Opt in to the synthetic profile's lossy codecs: these tests are about shares and speeds (issue 16: faithful by
default)."""

MODEL = "vit-base-patch16-224"


def _serve(profile, estimator, request, true_scale, requests, host_load=1.0):
    """Plan and 'run' `requests` requests on devices whose real speed is the profile's x `true_scale`, on a host
    whose other work slows every device by `host_load` (a float, or one per request): each plan rank's measured
    compute is the cost model's at its real speed. Returns the plans."""
    plans = []
    loads = host_load if isinstance(host_load, (list, tuple)) else [host_load] * requests
    for load in loads[:requests]:
        link = LinkEstimate(profile.link.bandwidth_bps, profile.link.latency_s,
                            device_speed_scale=estimator.scales())
        plan = choose_plan(profile, request, link, limits=ANY_CODEC)
        plans.append(plan)
        if plan.mode == "local":
            estimator.update((), (), ())
            continue
        unit = rank_compute_s(profile, request.batch, plan.token_counts, profile.codec(plan.codec))
        measured = [u * load / (profile.device_speeds[r] * true_scale[r]) for u, r in zip(unit, plan.ranks)]
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
    # confirmed by the second slow request; from the third on the plan no longer waits on it: within 5 % of the best
    assert plans[1].ranks == (0, 1, 2, 3)
    assert all(predict(profile, request, p, truth).total_s <= 1.05 * best_s for p in plans[estimator.confirm:])
    # restored: after `retry_after` requests it is tried halfway to its baseline, that probe is taken at once, kept
    plans = _serve(profile, estimator, request, normal, estimator.retry_after + 3)
    assert plans[-1].ranks == (0, 1, 2, 3) and estimator.scales() is None


def test_a_still_slow_device_is_dropped_again_after_its_retry():
    profile = synthetic_profile(world_size=3, device_speeds=(1.0, 1.0, 1.0))
    request = Request(MODEL, 8, 197)
    estimator = ComputeSpeedEstimator(3, retry_after=3)
    _serve(profile, estimator, request, (1.0, 1.0, 1.0), 2)
    plans = _serve(profile, estimator, request, (1.0, 0.02, 1.0), 14)
    with_it = [i for i, p in enumerate(plans) if 1 in p.ranks]
    assert with_it[:2] == [0, 1]  # the two requests that confirm the change
    retries = with_it[2:]
    assert 1 <= len(retries) <= 3 and all(b - a > 1 for a, b in zip(with_it[1:], retries))  # each retry: dropped again


def test_a_busy_host_and_a_lone_outlier_move_nothing():
    profile = synthetic_profile(world_size=4, device_speeds=(0.5, 0.5, 0.5, 0.5))
    request = Request(MODEL, 8, 197)
    estimator = ComputeSpeedEstimator(4)
    _serve(profile, estimator, request, (1.0,) * 4, 2)
    # every device slowed 2.5x by other work on the machine (against the profile alone: "all slow")
    plans = _serve(profile, estimator, request, (1.0,) * 4, 6, host_load=[2.5, 3.0, 2.0, 2.5, 3.5, 1.0])
    assert estimator.scales() is None and all(p.ranks == (0, 1, 2, 3) for p in plans)
    # one request in which rank 3 was descheduled: held back, not confirmed, forgotten
    _serve(profile, estimator, request, (1.0, 1.0, 1.0, 0.2), 1)
    assert estimator.scales() is None and estimator.changes == 0
    plans = _serve(profile, estimator, request, (1.0,) * 4, 3)
    assert estimator.scales() is None and plans[-1].ranks == (0, 1, 2, 3)


def test_rank_0_slowed_shifts_tokens_to_the_others():
    profile = synthetic_profile(world_size=2, device_speeds=(1.0, 1.0))
    request = Request(MODEL, 8, 197)
    estimator = ComputeSpeedEstimator(2)
    before = _serve(profile, estimator, request, (1.0, 1.0), 2)[-1]
    after = _serve(profile, estimator, request, (0.4, 1.0), 3)[-1]
    assert estimator.scale(0) == 1.0 and estimator.scale(1) == pytest.approx(2.5)  # relative to rank 0
    assert after.mode == "distributed" and after.token_counts[1] > before.token_counts[1]


def test_excluded_ranks_and_missing_reference_and_bad_arguments():
    estimator = ComputeSpeedEstimator(3, retry_after=2)
    for _ in range(2):
        estimator.update((0, 1, 2), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    for _ in range(3):  # the decoding rank measured with its decode: left out, neither learned from nor aged
        estimator.update((0, 1, 2), (1.0, 1.0, 1.0), (1.0, 1.0, 9.0), exclude=(2,))
    assert estimator.scales() is None and estimator._unseen == [0, 0, 0]
    estimator.update((0, 1), (1.0, 1.0), (1e-4, 0.2))  # rank 0 too short to judge: nothing to compare with
    estimator.update((0, 1), (1.0, 1.0), (1e-4, 0.2))
    assert estimator.scales() is None
    with pytest.raises(ValueError, match="confirm"):
        ComputeSpeedEstimator(2, confirm=0)
    with pytest.raises(ValueError, match="change_factor"):
        ComputeSpeedEstimator(2, change_factor=1.0)


def test_real_two_rank_decoder_prefill_and_decode_are_read_right(monkeypatch):
    """2 real ranks (loopback), llama-tiny: the decoding rank's wall time holds its decode, which the prefill's
    prediction does not — left out, so the estimate stays put; prefill-only requests are learned from."""
    config = get_config("llama-tiny")
    profile = synthetic_profile("llama-tiny", device_speeds=(1.0, 1.0), bandwidth_bps=1e9, latency_s=1e-4,
                                seconds_per_image=3000, codecs=synthetic_codecs(config.exchange_width)[:1])
    prompt = {"input_ids": torch.randint(0, config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(4))}
    seen = []
    with launch_local(2, "llama-tiny", profile, config=EngineConfig(learn_compute=False, learn_link=False)) as engine:
        original = engine.speed_estimator.update

        def spy(ranks, predicted, measured, exclude=()):
            seen.append((tuple(ranks), tuple(predicted), tuple(measured), tuple(exclude)))
            original(ranks, predicted, measured, exclude)

        monkeypatch.setattr(engine.speed_estimator, "update", spy)
        for _ in range(4):
            assert engine.infer(prompt).metrics.plan["ranks"] == [0, 1]
        for _ in range(3):
            assert engine.generate(prompt, 48).metrics.plan["ranks"] == [0, 1]
        scales = engine.speed_estimator.scales()
    prefill = [s for s in seen if s[0] == (0, 1) and not s[3]]
    decode = [s for s in seen if s[3] == (1,)]
    assert len(prefill) >= 3 and len(decode) == 3  # the plan's first request pays set-up and is not learned from

    # How far the decode inflates the last rank's wall time is a timing (5-8x on a quiet host, less under load),
    # so it is not asserted here; what is: those requests leave the decoding rank out, and nothing is flagged.
    assert all(s[3] == (1,) and s[0] == (0, 1) for s in decode)
    assert scales is None
