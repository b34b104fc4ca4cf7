"""The planner on synthetic profiles: decisions, limits, determinism, and agreement with the cost model."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from edgeprism.plan import (
    Candidate,
    Limits,
    LinkEstimate,
    Plan,
    Request,
    choose_plan,
    codec_exclusion,
    enumerate_candidates,
    predict,
)
from edgeprism.plan.cost import objective_score
from edgeprism.plan.synthetic import synthetic_profile

MODEL = "vit-base-patch16-224"
ANY_CODEC = Limits(max_fidelity_loss=None, allow_unmeasured_codecs=True)
"""The explicit opt-in to every profiled codec, lossy or unmeasured (the default budget admits neither)."""


def _link(profile, **kw) -> LinkEstimate:
    return LinkEstimate(
        kw.pop("bandwidth_bps", profile.link.bandwidth_bps), kw.pop("latency_s", profile.link.latency_s), **kw
    )


def test_small_requests_stay_local_when_the_exchange_dominates():
    profile = synthetic_profile(world_size=4)
    # One short text-like request: 12 exchanges of a few ms cost more than the compute they save.
    plan = choose_plan(profile, Request(MODEL, 1, 17), _link(profile))
    assert plan.mode == "local" and plan.ranks == (0,) and plan.codec == ""
    # A batch of one image on a slow, high-latency link stays local too.
    plan = choose_plan(profile, Request(MODEL, 1, 197), _link(profile, bandwidth_bps=10e6, latency_s=0.02))
    assert plan.mode == "local"


def test_large_batches_go_distributed_with_compression():
    profile = synthetic_profile(world_size=4)
    plan = choose_plan(profile, Request(MODEL, 16, 197), _link(profile), limits=ANY_CODEC)
    assert plan.mode == "distributed" and len(plan.ranks) >= 2
    assert profile.codec(plan.codec).wire_bytes_per_token < profile.codec("fp32").wire_bytes_per_token
    assert sum(plan.token_counts) == 197 and min(plan.token_counts) >= 1
    assert "vs local" in plan.reason


def test_energy_objective_can_choose_differently_from_latency():
    profile = synthetic_profile(world_size=2)
    request, link = Request(MODEL, 8, 197), _link(profile)
    fastest = choose_plan(profile, request, link, "latency", ANY_CODEC)
    thriftiest = choose_plan(profile, request, link, "energy", ANY_CODEC)
    assert fastest.mode == "distributed" and thriftiest.mode == "local"
    assert thriftiest.predicted_energy_j < fastest.predicted_energy_j
    assert fastest.predicted_latency_s < thriftiest.predicted_latency_s
    edp = choose_plan(profile, request, link, "edp", ANY_CODEC)
    assert edp.predicted_latency_s * edp.predicted_energy_j <= min(
        p.predicted_latency_s * p.predicted_energy_j for p in (fastest, thriftiest)) + 1e-12


@pytest.mark.parametrize("objective", ["latency", "energy", "edp"])
def test_one_percent_budget_never_picks_an_over_budget_codec(objective):
    profile = synthetic_profile(world_size=3, device_speeds=(1.0, 0.7, 1.3))
    limits = Limits(max_fidelity_loss=0.01)
    for batch, tokens, bandwidth in itertools.product((1, 4, 32), (17, 197, 785), (5e6, 50e6, 1e9)):
        plan = choose_plan(profile, Request(MODEL, batch, tokens), _link(profile, bandwidth_bps=bandwidth),
                           objective, limits)
        if plan.mode == "distributed":
            loss = profile.codec(plan.codec).loss
            assert loss is not None and loss <= 0.01, plan


def test_budget_outside_unit_interval_is_a_value_error():
    for bad in (-0.01, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"max_fidelity_loss must be in \[0, 1\]"):
            Limits(max_fidelity_loss=bad)
    with pytest.raises(ValueError, match="max_latency_s must be > 0"):
        Limits(max_latency_s=0.0)


def test_unmeasured_codecs_are_excluded_under_a_budget_and_say_so():
    profile = synthetic_profile(world_size=2)
    request, link = Request(MODEL, 32, 197), _link(profile, bandwidth_bps=1e9)
    limits = Limits(max_fidelity_loss=1.0)  # everything measured passes; int4 was never measured
    candidates = enumerate_candidates(profile, request, link, "latency", limits)
    int4 = [c for c in candidates if c.plan.codec == "int4"]
    assert int4 and all("fidelity not measured" in c.excluded for c in int4)
    assert choose_plan(profile, request, link, "latency", limits).codec != "int4"
    assert all(c.excluded and "--allow-unmeasured-codecs" in c.excluded
               for c in enumerate_candidates(profile, request, link) if c.plan.codec == "int4")
    assert any(c.plan.codec == "int4" and c.excluded is None
               for c in enumerate_candidates(profile, request, link, "latency", ANY_CODEC))


def test_latency_ceiling_excludes_and_falls_back_to_the_fastest():
    profile = synthetic_profile(world_size=2)
    request, link = Request(MODEL, 8, 197), _link(profile)
    free = choose_plan(profile, request, link, "energy", ANY_CODEC)
    assert free.mode == "local"
    ceiling = dataclasses.replace(ANY_CODEC, max_latency_s=free.predicted_latency_s * 0.9)
    capped = choose_plan(profile, request, link, "energy", ceiling)
    assert capped.mode == "distributed" and capped.within_limits
    assert capped.predicted_latency_s <= free.predicted_latency_s * 0.9
    impossible = choose_plan(profile, request, link, "energy", dataclasses.replace(ANY_CODEC, max_latency_s=1e-3))
    fastest = choose_plan(profile, request, link, "latency", ANY_CODEC)
    assert not impossible.within_limits and "no candidate meets" in impossible.reason
    assert (impossible.ranks, impossible.codec) == (fastest.ranks, fastest.codec)


def test_unhealthy_ranks_are_never_used():
    profile = synthetic_profile(world_size=4, device_speeds=(1.0, 2.0, 1.5, 1.2))
    request = Request(MODEL, 16, 197)
    assert 1 in choose_plan(profile, request, _link(profile), limits=ANY_CODEC).ranks
    plan = choose_plan(profile, request, _link(profile, healthy_ranks=(0, 2, 3)), limits=ANY_CODEC)
    assert plan.mode == "distributed" and 1 not in plan.ranks
    assert choose_plan(profile, request, _link(profile, healthy_ranks=(0,))).mode == "local"


def test_token_shares_follow_device_speed():
    profile = synthetic_profile(world_size=2, device_speeds=(1.0, 3.0))
    plan = choose_plan(profile, Request(MODEL, 16, 197), _link(profile), limits=ANY_CODEC)
    assert plan.mode == "distributed"
    # the plan's shares are its token counts (balanced to the speeds: about proportional here)
    assert plan.token_shares == pytest.approx((49 / 197, 148 / 197))
    assert plan.token_counts == (49, 148)


def test_too_few_tokens_limit_the_group_size():
    profile = synthetic_profile(world_size=4)
    request = Request(MODEL, 64, 2)
    plan = choose_plan(profile, request, _link(profile, bandwidth_bps=1e12, latency_s=0.0))
    assert len(plan.ranks) <= 2
    unsplittable = [c for c in enumerate_candidates(profile, request, _link(profile)) if c.prediction is None]
    assert unsplittable and all("2 tokens cannot give" in c.excluded for c in unsplittable)


def test_deterministic_and_consistent_with_enumeration_and_predict():
    profile = synthetic_profile(world_size=4, device_speeds=(1.0, 0.6, 1.4, 0.9), staging=True)
    for objective, budget, batch, tokens, bandwidth in itertools.product(
            ("latency", "energy", "edp"), (None, 0.05), (1, 8), (50, 197), (20e6, 300e6)):
        request, link = Request(MODEL, batch, tokens), _link(profile, bandwidth_bps=bandwidth)
        limits = Limits(budget, allow_unmeasured_codecs=budget is None)
        plan = choose_plan(profile, request, link, objective, limits)
        assert plan == choose_plan(profile, request, link, objective, limits)
        candidates = enumerate_candidates(profile, request, link, objective, limits)
        allowed = [c for c in candidates if c.excluded is None]
        best = min(objective_score(objective, c.prediction.total_s, c.prediction.energy_j) for c in allowed)
        got = objective_score(objective, plan.predicted_latency_s, plan.predicted_energy_j)
        assert got == pytest.approx(best, rel=1e-12)
        pred = predict(profile, request, plan, link)
        assert pred.total_s == pytest.approx(plan.predicted_latency_s, rel=1e-12)
        assert pred.energy_j == pytest.approx(plan.predicted_energy_j, rel=1e-12)
        assert plan.profile_hash == profile.profile_hash()


def test_plan_is_printable_and_round_trips_through_json():
    profile = synthetic_profile(world_size=3)
    plan = choose_plan(profile, Request(MODEL, 8, 197), _link(profile), limits=Limits(max_fidelity_loss=0.05))
    assert Plan.from_json(plan.to_json()) == plan
    text = str(plan)
    assert "\n" not in text and plan.codec in text and "ms" in text and "best latency" in text
    assert "fidelity budget" in plan.reason
    with pytest.raises(ValueError, match="not a plan"):
        Plan.from_dict({"mode": "local", "colour": 1})
    cand = enumerate_candidates(profile, Request(MODEL, 8, 197), _link(profile))[0]
    assert isinstance(cand, Candidate) and cand.to_dict()["plan"]["mode"] == "local"


def test_bad_requests_are_value_errors():
    profile = synthetic_profile()
    link = _link(profile)
    with pytest.raises(ValueError, match="request is for model bert-base"):
        choose_plan(profile, Request("bert-base", 1, 8), link)
    with pytest.raises(ValueError, match="objective must be one of latency, energy, edp"):
        choose_plan(profile, Request(MODEL, 1, 197), link, "speed")
    with pytest.raises(ValueError, match="batch must be >= 1"):
        Request(MODEL, 0, 197)
    with pytest.raises(ValueError, match="bandwidth_bps must be > 0"):
        LinkEstimate(0.0, 0.001)


def test_dominated_codecs_do_not_change_the_decision():
    base = synthetic_profile(world_size=2)
    worse = dataclasses.replace(base.codec("sm16+int8"), codec="sm16+int8-bloated", wire_bytes_per_token=1e4)
    profile = dataclasses.replace(base, codecs=base.codecs + (worse,))
    request, link = Request(MODEL, 16, 197), _link(profile)
    assert choose_plan(profile, request, link, limits=ANY_CODEC).codec == \
        choose_plan(base, request, link, limits=ANY_CODEC).codec


@pytest.mark.parametrize("model, tokens", [("gpt2-124m", 300), ("bert-base", 64)])
def test_pruning_never_loses_the_optimum(model, tokens):
    # Bounds and dominance only skip what cannot win: the choice matches brute force over all candidates.
    profile = synthetic_profile(model, world_size=6, device_speeds=(1.0, 0.5, 2.0, 0.9, 1.1, 0.7), medium="shared")
    for objective, ceiling, batch, bandwidth in itertools.product(
            ("latency", "energy", "edp"), (None, 0.5), (1, 32), (10e6, 1e9)):
        request, link = Request(model, batch, tokens), _link(profile, bandwidth_bps=bandwidth)
        limits = Limits(max_latency_s=ceiling)
        plan = choose_plan(profile, request, link, objective, limits)
        allowed = [c for c in enumerate_candidates(profile, request, link, objective, limits) if c.excluded is None]
        if not allowed:
            assert not plan.within_limits
            continue
        best = min(objective_score(objective, c.prediction.total_s, c.prediction.energy_j) for c in allowed)
        assert objective_score(objective, plan.predicted_latency_s, plan.predicted_energy_j) == pytest.approx(best)


def test_faithful_by_default_only_measured_codecs_within_one_percent_or_lossless():
    profile = synthetic_profile(world_size=2)
    link = _link(profile, bandwidth_bps=1e9, latency_s=1e-4)  # a link on which compression would pay
    lossy = choose_plan(profile, Request(MODEL, 32, 197), link, limits=ANY_CODEC)
    assert lossy.mode == "distributed" and profile.codec(lossy.codec).fidelity_loss != 0.0, lossy
    assert Limits().max_fidelity_loss == 0.01 and not Limits().allow_unmeasured_codecs
    for batch, tokens, bandwidth in itertools.product((1, 8, 32), (50, 197), (5e6, 1e9)):
        plan = choose_plan(profile, Request(MODEL, batch, tokens), _link(profile, bandwidth_bps=bandwidth))
        entry = None if plan.mode == "local" else profile.codec(plan.codec)
        assert entry is None or (entry.fidelity_loss is not None and entry.fidelity_loss <= 0.01), plan
        assert plan.fidelity_loss == (0.0 if entry is None else entry.fidelity_loss)
    assert "unmeasured fidelity" in choose_plan(profile, Request(MODEL, 32, 197), link).reason


def test_unmeasured_lossless_codecs_count_as_zero_loss_and_opt_in_plans_say_unmeasured():
    base = synthetic_profile(world_size=2)
    unmeasured = tuple(dataclasses.replace(c, metric=None, value=None, reference_value=None, loss=None)
                       for c in base.codecs)
    profile = dataclasses.replace(base, codecs=unmeasured)
    assert [c.codec for c in profile.codecs if c.fidelity_loss == 0.0] == ["fp32", "fp16"]
    request, link = Request(MODEL, 32, 197), _link(profile, bandwidth_bps=1e9, latency_s=1e-4)
    faithful = choose_plan(profile, request, link)
    assert faithful.mode == "local" or faithful.codec in ("fp32", "fp16")
    opted = choose_plan(profile, request, link, limits=Limits(allow_unmeasured_codecs=True))
    assert opted.mode == "distributed" and opted.codec not in ("fp32", "fp16") and opted.fidelity_loss is None
    assert "fidelity loss unmeasured" in str(opted)
    assert Plan.from_json(opted.to_json()) == opted


def test_an_allowed_codec_list_restricts_the_choice_and_unlisted_codecs_hide_nothing():
    profile = synthetic_profile(world_size=2)
    request, link = Request(MODEL, 32, 197), _link(profile, bandwidth_bps=1e9, latency_s=1e-4)
    free = choose_plan(profile, request, link, limits=ANY_CODEC)
    assert free.codec not in ("int8", "fp16"), free  # something lighter wins when everything is allowed
    listed = dataclasses.replace(ANY_CODEC, codecs=("fp16", "int8"))
    plan = choose_plan(profile, request, link, limits=listed)
    assert plan.mode == "local" or plan.codec in ("fp16", "int8")
    brute = [c for c in enumerate_candidates(profile, request, link, "latency", listed) if c.excluded is None]
    assert {c.plan.codec for c in brute} <= {"", "fp16", "int8"}
    assert plan.predicted_latency_s == pytest.approx(min(c.prediction.total_s for c in brute))
    assert "not among the allowed codecs" in codec_exclusion(profile.codec("sm4"), listed)
