"""The planner picks each request's micro-batch count (plan/micro.py): the cost model at every offered count,
the best kept and recorded in the plan, which the engine runs and sends to its workers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from edgeprism.models.config import get_config
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.plan import Limits, LinkEstimate, Plan, Request, choose_plan, static_plan
from edgeprism.plan.micro import MICRO_BATCH_CHOICES, micro_batch_options, with_micro_batches
from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile
from edgeprism.runtime import EngineConfig, launch_local

OPEN = Limits(allow_unmeasured_codecs=True)


def _link(profile, count, offered=None):
    link = with_micro_batches(LinkEstimate(profile.link.bandwidth_bps, profile.link.latency_s, overlap=True), count)
    return link if offered is None else dataclasses.replace(link, micro_batch_choices=offered)


def test_the_options_follow_the_batch_the_overlap_and_the_model_kind():
    link = with_micro_batches(LinkEstimate(50e6, 3e-3, overlap=True), None)
    assert micro_batch_options(link, 8, causal=False) == MICRO_BATCH_CHOICES == (2, 4)
    assert micro_batch_options(link, 3, causal=False) == (2,)  # a slice holds a row at least
    assert micro_batch_options(link, 1, causal=False) == (1,)
    offered = dataclasses.replace(link, micro_batch_choices=(1, 2, 4))
    assert micro_batch_options(offered, 3, causal=False) == (1, 2)
    assert micro_batch_options(link, 8, causal=True) == (1,)  # decoders run unsliced
    assert micro_batch_options(dataclasses.replace(link, overlap=False), 8, causal=False) == (1,)
    assert micro_batch_options(with_micro_batches(link, 2), 8, causal=False) == (2,)  # a fixed count is kept
    assert link.micro_batches == 2  # where one count is costed (`edgeprism plan`'s candidate list)


def test_the_chosen_plan_is_the_best_of_the_plans_at_each_count():
    profile = synthetic_profile("vit-base-patch16-224", world_size=4, bandwidth_bps=300e6)
    request = Request(profile.model.name, 8, 197)
    chosen = choose_plan(profile, request, _link(profile, None, (1, 2, 4)), limits=OPEN)
    at = {m: choose_plan(profile, request, _link(profile, m), limits=OPEN) for m in (1, 2, 4)}
    assert chosen.mode == "distributed"
    best = min(at, key=lambda m: (at[m].predicted_latency_s, m))
    assert chosen.micro_batches == best
    assert chosen.predicted_latency_s == pytest.approx(at[best].predicted_latency_s)
    assert (chosen.codec, chosen.token_counts) == (at[best].codec, at[best].token_counts)
    assert all(p.micro_batches == m for m, p in at.items() if p.mode == "distributed")  # a fixed count is recorded
    assert f"{best} micro-batch(es) of [1, 2, 4]" in chosen.reason


def test_more_micro_batches_win_only_when_they_hide_more_than_they_cost():
    """Offered 1, 2 or 4: a slow link hides behind more slices; a free link has nothing to hide, and every
    slice costs its fixed cost and hops, so one is best."""
    slow = synthetic_profile("vit-base-patch16-224", world_size=2, bandwidth_bps=100e6, latency_s=1e-4)
    fast = synthetic_profile("vit-base-patch16-224", world_size=2, bandwidth_bps=1e12, latency_s=1e-3)
    request = Request(slow.model.name, 8, 197)
    on_slow = choose_plan(slow, request, _link(slow, None, (1, 2, 4)), limits=OPEN)
    on_fast = choose_plan(fast, request, _link(fast, None, (1, 2, 4)), limits=OPEN)
    assert on_slow.mode == on_fast.mode == "distributed"
    assert on_slow.micro_batches > 1 and on_fast.micro_batches == 1


def test_a_local_plan_and_a_static_plan_record_their_count():
    profile = synthetic_profile("vit-base-patch16-224", world_size=2, bandwidth_bps=50e6)
    request = Request(profile.model.name, 8, 197)
    local = static_plan(profile, request, _link(profile, None), "local")
    assert local.mode == "local" and local.micro_batches == 1
    fixed = static_plan(profile, request, _link(profile, 2), "distributed", "fp16")
    assert fixed.micro_batches == 2
    free = static_plan(profile, request, _link(profile, None), "distributed", "fp16")
    assert free.predicted_latency_s <= fixed.predicted_latency_s + 1e-12


def test_plan_json_keeps_the_count_and_old_plans_load_as_one():
    profile = synthetic_profile("vit-base-patch16-224", world_size=2, bandwidth_bps=100e6, latency_s=1e-4)
    plan = choose_plan(profile, Request(profile.model.name, 8, 197), _link(profile, None), limits=OPEN)
    assert Plan.from_json(plan.to_json()) == plan
    old = plan.to_dict()
    del old["micro_batches"]
    assert Plan.from_dict(old).micro_batches == 1
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        dataclasses.replace(plan, micro_batches=0)


def test_the_engine_leaves_the_count_to_the_planner_by_default():
    assert EngineConfig().micro_batches is None
    assert EngineConfig(micro_batches=2).micro_batches == 2
    with pytest.raises(ValueError, match="micro_batches 0 must be >= 1"):
        EngineConfig(micro_batches=0)


def test_the_engine_runs_the_count_its_planner_chose_and_answers_as_the_local_model():
    """Default config: the planner picks the count per request; rank 0 runs it and the worker follows the
    header. Over this slow link the split beats one device only with its exchange hidden behind 2 slices (the
    cost model: 1 slice 855 ms, 2 slices 810 ms, local 823 ms); a batch of 1 cannot be sliced."""
    config = get_config("vit-tiny-test")
    profile = synthetic_profile("vit-tiny-test", bandwidth_bps=7e5, latency_s=1e-4, seconds_per_image=3000,
                                codecs=synthetic_codecs(config.hidden_size)[:1])  # fp32 only: exact
    engine_config = EngineConfig(learn_compute=False, learn_link=False, learn_speeds=False)
    with launch_local(2, "vit-tiny-test", profile, config=engine_config) as engine:
        inputs = synthetic_inputs(config, 4, seed=4)
        planned = engine.plan_for(inputs)
        result = engine.infer(inputs)
        assert result.metrics.mode == "distributed", result.metrics.plan
        assert result.metrics.plan["micro_batches"] == planned.micro_batches > 1, planned.reason
        with torch.no_grad():
            reference = engine.model(inputs)
        for key, value in result.outputs.items():
            assert (value - reference[key]).abs().max() <= 1e-4, key
        assert engine.plan_for(synthetic_inputs(config, 1, seed=1)).micro_batches == 1
