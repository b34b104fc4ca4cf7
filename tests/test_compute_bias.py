"""Online compute re-estimation: when local compute runs faster or slower than the profile says
(relative to distributed compute), the planner's choice follows."""

import pytest

from edgeprism.plan import Limits, LinkEstimate, Request, choose_plan
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.runtime.link_estimate import ComputeBiasEstimator


def test_local_compute_scale_moves_the_choice():
    profile = synthetic_profile("vit-base-patch16-224", 2)
    request = Request("vit-base-patch16-224", 8, 197)
    base = LinkEstimate(50e6, 3e-3)
    any_codec = Limits(None, allow_unmeasured_codecs=True)  # opt in: the synthetic profile's fast codecs are lossy
    assert choose_plan(profile, request, base, limits=any_codec).mode == "distributed"  # the profile's own answer
    faster_local = LinkEstimate(50e6, 3e-3, local_compute_scale=0.3)
    plan = choose_plan(profile, request, faster_local, limits=any_codec)
    assert plan.mode == "local"
    assert plan.predicted_latency_s == pytest.approx(
        0.3 * choose_plan(profile, Request("vit-base-patch16-224", 8, 197), LinkEstimate(1.0, 10.0)).predicted_latency_s
    )


def test_estimator_needs_both_modes_and_tracks_their_ratio():
    bias = ComputeBiasEstimator(alpha=1.0)
    assert bias.local_compute_scale == 1.0
    bias.update("local", 0.5, 1.0)
    assert bias.local_compute_scale == 1.0  # nothing distributed seen yet
    bias.update("distributed", 2.0, 2.0)
    assert bias.local_compute_scale == pytest.approx(0.5)
    bias.update("local", 100.0, 1.0)
    assert bias.local_compute_scale == 5.0  # clamped


def test_bad_scale_is_refused():
    with pytest.raises(ValueError, match="local_compute_scale"):
        LinkEstimate(50e6, 3e-3, local_compute_scale=0.0)
