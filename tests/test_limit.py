"""The physical limit of a split (plan/limit.py): a perfect split's compute, the wire at the link's rate and the
link latencies, overlapped or summed."""

from __future__ import annotations

import pytest

from edgeprism.plan import Limits, LinkEstimate, Request, choose_plan, static_plan
from edgeprism.plan.cost import distributed_terms, local_terms, message_rounds
from edgeprism.plan.limit import split_limit
from edgeprism.plan.synthetic import synthetic_profile

MODEL = "vit-base-patch16-224"


def test_local_limit_is_its_compute_and_a_split_divides_it_by_the_group_speed():
    profile = synthetic_profile(world_size=3, device_speeds=(1.0, 2.0, 1.0))
    request, link = Request(MODEL, 8, 197), LinkEstimate(50e6, 3e-3)
    one_s, _ = local_terms(profile, 8, 197)
    local = split_limit(profile, request, static_plan(profile, request, link, "local"), link)
    assert local.limit_s == local.sequential_limit_s == pytest.approx(one_s) and local.compute_to_comm is None
    plan = static_plan(profile, request, link, "distributed", "fp16", ranks=(0, 1, 2))
    limit = split_limit(profile, request, plan, link)
    assert limit.compute_s == pytest.approx(one_s / 4)  # speeds 1 + 2 + 1 in units of rank 0's
    terms = distributed_terms(profile, 8, [1.0, 2.0, 1.0], plan.token_counts, profile.codec("fp16"), 50e6, 3e-3)
    assert limit.wire_s == pytest.approx(terms.network_s) and limit.wire_s > 0
    assert limit.latency_s == pytest.approx(message_rounds(12, 3, False) * 3e-3)
    assert limit.limit_s == pytest.approx(max(limit.compute_s, limit.wire_s) + limit.latency_s)
    assert limit.sequential_limit_s == pytest.approx(limit.compute_s + limit.wire_s + limit.latency_s)
    assert limit.compute_to_comm == pytest.approx(limit.compute_s / (limit.wire_s + limit.latency_s))


def test_full_exchange_never_beats_its_limit_in_the_cost_model():
    profile = synthetic_profile(world_size=2, staging=True)
    for batch, bandwidth in ((1, 20e6), (8, 50e6), (32, 1e9)):
        request, link = Request(MODEL, batch, 197), LinkEstimate(bandwidth, 2e-3)
        plan = static_plan(profile, request, link, "distributed", "fp32")
        limit = split_limit(profile, request, plan, link)
        assert limit.limit_s <= limit.sequential_limit_s <= plan.predicted_latency_s * (1 + 1e-9), (plan, limit)
        any_codec = choose_plan(profile, request, link, limits=Limits(None, allow_unmeasured_codecs=True))
        assert split_limit(profile, request, any_codec, link).limit_s > 0
