"""Static baselines: the plan a fixed strategy would run, with the same cost model as the planner."""

import pytest

from edgeprism.plan import LinkEstimate, Request, choose_plan, static_plan
from edgeprism.plan.synthetic import synthetic_profile


def test_static_plans_and_the_adaptive_choice_agree_on_predictions():
    profile = synthetic_profile("vit-base-patch16-224", 2)
    request = Request("vit-base-patch16-224", 8, 197)
    link = LinkEstimate(50e6, 3e-3)
    local = static_plan(profile, request, link, "local")
    full = static_plan(profile, request, link, "distributed", "fp32")
    adaptive = choose_plan(profile, request, link)
    assert local.mode == "local" and full.codec == "fp32" and full.ranks == (0, 1)
    assert adaptive.predicted_latency_s <= min(local.predicted_latency_s, full.predicted_latency_s)


def test_unknown_static_codec_names_the_profiled_ones():
    profile = synthetic_profile("vit-base-patch16-224", 2)
    with pytest.raises(ValueError, match="profiled codecs"):
        static_plan(profile, Request("vit-base-patch16-224", 1, 197), LinkEstimate(50e6, 3e-3), "distributed", "zz")
