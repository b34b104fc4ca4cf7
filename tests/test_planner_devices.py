"""The planner over devices of different speeds (synthetic profiles): uneven shares near the best split, a
slow device left out, live speeds (stragglers), and the all-gather over P ranks on a shared medium."""

import os
import shutil
import subprocess
import warnings

import pytest

from edgeprism.plan import Limits, LinkEstimate, Request, choose_plan, predict, static_plan
from edgeprism.plan.cost import profile_constants, rank_compute_s
from edgeprism.plan.shares import balanced_weights, candidate_splits, split_grid
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.profile.link import link_section
from edgeprism.testbed.net import Testbed
from edgeprism.testbed.presets import get_preset

ANY_CODEC = Limits(None, allow_unmeasured_codecs=True)
"""Opt in to the synthetic profile's lossy codecs: these tests are about shares and speeds (issue 16: faithful by
default)."""

MODEL = "vit-base-patch16-224"


def _link(profile, **kw):
    return LinkEstimate(profile.link.bandwidth_bps, profile.link.latency_s, **kw)


def _oracle_s(profile, request, link, codec, ranks):
    """Best predicted latency over every split in 5 % steps (the goal's oracle, under the cost model)."""
    return min(static_plan(profile, request, link, "distributed", codec, ranks, token_counts=counts).predicted_latency_s
               for counts in split_grid(request.num_tokens, len(ranks)))


@pytest.mark.parametrize("speeds", [(1.0, 0.4), (1.0, 0.7, 0.4), (0.5, 0.5, 0.5, 0.5), (1.0, 0.5, 0.5, 0.25)])
def test_uneven_split_is_within_5_percent_of_the_best_split_and_beats_equal(speeds):
    profile = synthetic_profile(world_size=len(speeds), device_speeds=speeds)
    request = Request(MODEL, 8, 197)
    link = _link(profile)
    plan = choose_plan(profile, request, link, limits=ANY_CODEC)
    assert plan.mode == "distributed"
    oracle_s = _oracle_s(profile, request, link, plan.codec, plan.ranks)
    assert plan.predicted_latency_s <= 1.05 * oracle_s
    k = len(plan.ranks)
    equal = static_plan(profile, request, link, "distributed", plan.codec, plan.ranks,
                        token_counts=tuple(request.num_tokens // k + (r < request.num_tokens % k) for r in range(k)))
    assert plan.predicted_latency_s <= equal.predicted_latency_s
    if len(set(speeds)) > 1:  # the slowest device in the plan gets the fewest tokens
        slowest = min(plan.ranks, key=lambda r: speeds[r])
        assert plan.token_counts[plan.ranks.index(slowest)] == min(plan.token_counts)
        assert equal.predicted_latency_s > 1.05 * plan.predicted_latency_s
    local = static_plan(profile, request, link, "local")
    assert plan.predicted_latency_s <= local.predicted_latency_s  # never loses to the device alone


def test_balanced_weights_level_the_layer_time_and_are_equal_for_equal_devices():
    profile = synthetic_profile(world_size=3, device_speeds=(1.0, 0.6, 0.3))
    constants = profile_constants(profile)
    weights = balanced_weights(constants, 8, (1.0, 0.6, 0.3), 197, rho=1.0)
    assert sum(weights) == pytest.approx(197)
    # at CR 1 every rank sees all 197 keys: its layer time is (a + B n (c_tok + c_kv 197) ...) / speed
    c = constants
    times = [(c.fixed_s + 8 * (c.per_token_s * n + (c.per_kv_s + c.per_token_kv_s * n) * 197)) / s
             for n, s in zip(weights, (1.0, 0.6, 0.3))]
    assert max(times) == pytest.approx(min(times), rel=1e-4)
    assert weights[2] < 0.3 / 1.9 * 197  # the fixed cost makes the slow device's share below proportional
    assert candidate_splits(constants, 8, (0.5, 0.5, 0.5), 197, None) == [(66, 66, 65)]


def test_a_very_slow_device_is_left_out():
    profile = synthetic_profile(world_size=4, device_speeds=(1.0, 1.0, 1.0, 0.03))
    plan = choose_plan(profile, Request(MODEL, 8, 197), _link(profile), limits=ANY_CODEC)
    assert plan.mode == "distributed" and 3 not in plan.ranks


def test_live_speed_scale_drops_a_straggler_and_takes_it_back():
    profile = synthetic_profile(world_size=3, device_speeds=(1.0, 1.0, 1.0))
    request = Request(MODEL, 8, 197)
    assert choose_plan(profile, request, _link(profile), limits=ANY_CODEC).ranks == (0, 1, 2)
    slowed = choose_plan(profile, request, _link(profile, device_speed_scale=(1.0, 0.02, 1.0)), limits=ANY_CODEC)
    assert slowed.ranks == (0, 2)  # rank 1 at 2 % of its speed: out
    quarter = choose_plan(profile, request, _link(profile, device_speed_scale=(1.0, 1.0, 0.25)), limits=ANY_CODEC)
    assert 2 not in quarter.ranks or quarter.token_counts[quarter.ranks.index(2)] < min(quarter.token_counts[:2])
    restored = choose_plan(profile, request, _link(profile, device_speed_scale=(1.0, 1.0, 1.0)), limits=ANY_CODEC)
    assert restored.ranks == (0, 1, 2)
    # rank 0 slowed makes the local plan slower too
    link = _link(profile)
    local = static_plan(profile, request, link, "local")
    slow0 = _link(profile, device_speed_scale=(0.5, 1.0, 1.0))
    assert predict(profile, request, local, slow0).compute_s == pytest.approx(2 * local.predicted_latency_s)
    with pytest.raises(ValueError, match="device_speed_scale"):
        _link(profile, device_speed_scale=(1.0, 0.0, 1.0))


def test_shared_medium_all_gather_costs_p_times_the_switched_one():
    request = Request(MODEL, 8, 197)
    for k in (2, 3, 4):
        switched = synthetic_profile(world_size=k)
        shared = synthetic_profile(world_size=k, medium="shared")
        ranks = tuple(range(k))
        counts = tuple(request.num_tokens // k + (r < request.num_tokens % k) for r in range(k))
        a = static_plan(switched, request, _link(switched), "distributed", "fp32", ranks, token_counts=counts)
        b = static_plan(shared, request, _link(shared), "distributed", "fp32", ranks, token_counts=counts)
        net_a = predict(switched, request, a, _link(switched)).network_s
        net_b = predict(shared, request, b, _link(shared)).network_s
        # per layer: (k - 1) padded messages per receiver; on one channel all k ranks' transfers queue
        layer_msg = 8 * 768 * 4 * max(counts)  # batch x hidden x fp32 bytes x largest share
        assert net_b - net_a == pytest.approx(12 * 8 * (k - 1) * (k - 1) * layer_msg / 50e6, rel=0.02)


def test_rank_compute_is_the_plan_compute_at_unit_speed():
    profile = synthetic_profile(world_size=2, device_speeds=(1.0, 1.0))
    request = Request(MODEL, 8, 197)
    plan = choose_plan(profile, request, _link(profile), limits=ANY_CODEC)
    per_rank = rank_compute_s(profile, 8, plan.token_counts, profile.codec(plan.codec))
    assert max(per_rank) == pytest.approx(predict(profile, request, plan, _link(profile)).compute_s)


def test_split_grid_covers_5_percent_steps():
    grid = split_grid(197, 2)
    assert len(grid) == 19 and (10, 187) in grid and (187, 10) in grid
    assert all(sum(c) == 197 for c in split_grid(197, 4))


def test_a_shared_medium_profile_takes_the_channel_rate_and_the_testbed_builds_one_channel():
    raw = {"latency_s": 0.004, "bandwidth_bps": 6.0e7, "allgather_bandwidth_bps": 3.0e7, "world_size": 2,
           "hops": 1, "latency_nbytes": 64, "bandwidth_nbytes": 1 << 20}
    shared = link_section(raw, "netns+tbf+air", medium="shared")
    assert shared.medium == "shared" and shared.bandwidth_bps == 6.0e7 and "SHARED" in shared.method
    assert link_section(raw).bandwidth_bps == 3.0e7  # switched: the per-rank all-gather rate
    with pytest.raises(ValueError, match="kernel testbed"):
        Testbed(2, get_preset("wifi4"), backend="loopback", medium="shared")
    if os.geteuid() != 0 or shutil.which("tc") is None:
        pytest.skip("the shared-medium testbed needs root and iproute2 (network namespaces)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3 hosts on a 2-core machine share cores: nothing computes here
        tb = Testbed(3, get_preset("wifi4"), backend="netns", medium="shared").up()
    with tb:
        switch = tb.namespaces[-1]
        qdiscs = subprocess.run(["tc", "-n", switch, "qdisc", "show"], capture_output=True, text=True).stdout
        filters = [subprocess.run(["tc", "-n", switch, "filter", "show", "dev", f"h{i}", "ingress"],
                                  capture_output=True, text=True).stdout for i in range(3)]
        assert tb.emulation == "netns+tbf+air" and "qdisc tbf 1: dev air" in qdiscs
        assert not any(f"tbf 1: dev h{i} " in qdiscs for i in range(3))  # no per-host link: one channel
        assert all("Redirect to device air" in f for f in filters), filters
