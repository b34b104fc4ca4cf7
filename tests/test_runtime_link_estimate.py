"""The online link estimate: recovers a link, follows a step change quickly, survives one-sized windows."""

import pytest

from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.runtime.link_estimate import LinkObservation, OnlineLinkEstimator


def _exchanges(latency_s, bandwidth_bps):
    shapes = [(64, 1), (100_000, 1), (10_000, 2), (1_000_000, 1)]  # (bytes on the path, hops)
    return [LinkObservation(n, h, latency_s * h + 8 * n / bandwidth_bps) for n, h in shapes]


def test_recovers_link_from_mixed_message_sizes():
    estimator = OnlineLinkEstimator(bandwidth_bps=50e6, latency_s=3e-3)
    estimate = estimator.update(_exchanges(1e-3, 100e6))
    assert estimate.latency_s == pytest.approx(1e-3, rel=1e-2)
    assert estimate.bandwidth_bps == pytest.approx(100e6, rel=1e-2)


@pytest.mark.parametrize("after", [(50e-3, 100e6), (1e-3, 5e6), (1e-4, 1e9)])
def test_step_change_is_followed_within_one_request(after):
    estimator = OnlineLinkEstimator(bandwidth_bps=100e6, latency_s=1e-3)
    for _ in range(5):
        estimator.update(_exchanges(1e-3, 100e6))
    estimate = estimator.update(_exchanges(*after))
    assert estimator.changes == 1
    assert estimate.latency_s == pytest.approx(after[0], rel=0.05)
    assert estimate.bandwidth_bps == pytest.approx(after[1], rel=0.05)


def test_one_message_size_moves_only_what_it_can_see():
    estimator = OnlineLinkEstimator(bandwidth_bps=50e6, latency_s=3e-3)
    estimate = estimator.update([LinkObservation(10, 1, 3e-3)] * 3)  # consistent with the seed: stays put
    assert estimate.latency_s == pytest.approx(3e-3, rel=1e-3)
    assert estimate.bandwidth_bps == pytest.approx(50e6, rel=1e-3)
    estimate = estimator.update([LinkObservation(10, 1, 30e-3)] * 3)  # tiny messages 10x slower: latency
    assert estimate.latency_s == pytest.approx(30e-3, rel=0.05)


def test_seeded_from_profile_and_never_non_positive():
    profile = synthetic_profile("vit-tiny-test", bandwidth_bps=20e6, latency_s=2e-3)
    estimator = OnlineLinkEstimator.from_profile(profile)
    assert estimator.estimate().bandwidth_bps == 20e6 and estimator.estimate().latency_s == 2e-3
    estimate = estimator.update([LinkObservation(1_000_000, 1, 0.0), LinkObservation(8, 1, 0.0)])  # free link
    assert estimate.bandwidth_bps > 0 and estimate.latency_s >= 0
    assert estimator.update([]) == estimate


def test_bad_inputs():
    with pytest.raises(ValueError):
        OnlineLinkEstimator(bandwidth_bps=0, latency_s=1e-3)
    with pytest.raises(ValueError):
        LinkObservation(10, 1, float("nan"))


def test_burst_is_not_read_as_a_faster_link():
    burst = 32_768.0
    shapes = [(64, 1), (100_000, 1), (10_000, 2), (1_000_000, 1), (300_000, 1)]
    observed = [LinkObservation(n, h, 3e-3 * h + 8 * max(0.0, n - burst) / 50e6) for n, h in shapes]
    estimate = OnlineLinkEstimator(bandwidth_bps=20e6, latency_s=1e-3, burst_bytes=burst).update(observed)
    assert estimate.latency_s == pytest.approx(3e-3, rel=1e-2)
    assert estimate.bandwidth_bps == pytest.approx(50e6, rel=1e-2)
    profile = synthetic_profile()
    assert OnlineLinkEstimator.from_profile(profile).burst_bytes == profile.link.burst_bytes
    with pytest.raises(ValueError, match="burst_bytes"):
        OnlineLinkEstimator(bandwidth_bps=1e6, latency_s=0.0, burst_bytes=-1.0)


def test_one_size_after_a_sag_scales_both_terms_and_never_reaches_the_ceiling():
    # a 50 -> 15 Mbit/s sag seen through requests of one message size each, growing: the estimate must
    # follow each size's time and not explain it all by latency with an infinitely fast link
    estimator = OnlineLinkEstimator(bandwidth_bps=37.8e6, latency_s=3.5e-3, burst_bytes=20_000)
    sizes = [21_500 * b for b in (1, 2, 4, 8, 16)]
    for n in sizes:
        observed = LinkObservation(n, 1, 8e-3 + 8 * max(0, n - 20_000) / 9e6)
        estimate = estimator.update([observed])
        assert estimate.bandwidth_bps < 50e6 and estimate.latency_s < 0.1, estimate
    assert estimate.bandwidth_bps == pytest.approx(9e6, rel=0.1) and estimate.latency_s == pytest.approx(8e-3, rel=0.25)


def test_no_rate_bound_bytes_move_only_the_latency():
    estimator = OnlineLinkEstimator(bandwidth_bps=50e6, latency_s=3e-3, burst_bytes=32_768)
    estimate = estimator.update([LinkObservation(10_000, 1, 9e-3)] * 2)  # under the burst: all latency
    assert estimate.latency_s == pytest.approx(9e-3, rel=1e-3) and estimate.bandwidth_bps == 50e6
