"""One splitter, one header: the cost model's token counts are the plan's ranges are what each rank embeds;
the plan carries its ranges through JSON; the request's header is checked against its plan."""

import json
import threading
from dataclasses import replace

import pytest
import torch

from edgeprism.comm.loopback import LoopbackGroup
from edgeprism.compress.registry import get_codec
from edgeprism.models.config import get_config
from edgeprism.models.loading import build_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.partition.ranges import TokenRange, apportion, split_tokens
from edgeprism.partition.transform import PositionWise
from edgeprism.plan import LinkEstimate, Plan, Request, choose_plan, predict
from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile
from edgeprism.runtime.control import ControlError, validate_control

SPEEDS = (1.0, 0.8, 0.6)  # uneven: rank 0 fastest
LINK = LinkEstimate(1e9, 1e-4)


def _plan(name, num_tokens, batch=2):
    """The planner's choice for a slow-compute profile on a fast link: all three ranks."""
    config = get_config(name)
    profile = synthetic_profile(name, device_speeds=SPEEDS, bandwidth_bps=1e9, latency_s=1e-4,
                                seconds_per_image=3000, codecs=synthetic_codecs(config.hidden_size)[:1])
    request = Request(name, batch, num_tokens)
    plan = choose_plan(profile, request, LINK, "latency")
    assert plan.mode == "distributed" and plan.ranks == (0, 1, 2), plan
    return profile, request, plan


def _infer_message(plan, split):
    return {"op": "infer", "request_id": "1", "epoch": 1, "plan": json.loads(plan.to_json()), "stall_s": 1.0,
            "split": json.loads(json.dumps(split))}


@pytest.mark.parametrize("name,inputs", [
    ("vit-tiny-test", {"image_size": 48}),  # 36 patches + [CLS] = 37 tokens
    ("gpt2-tiny-test", {"seq_len": 23}),
    ("bert-tiny-test", {"seq_len": 29}),
])
def test_cost_model_counts_plan_ranges_and_embedded_tokens_agree(name, inputs):
    model = build_model(name)
    batch = synthetic_inputs(model.config, 2, seed=3, **inputs)
    num_tokens = model.validate_input(batch)
    assert num_tokens % 2 == 1
    profile, request, plan = _plan(name, num_tokens)

    counts = plan.token_counts  # the planner's split (plan.shares: balanced to SPEEDS), which predict costs
    assert len(set(counts)) == 3 and list(counts) == sorted(counts, reverse=True), counts  # uneven, by speed
    assert sum(counts) == num_tokens
    assert predict(profile, request, plan, LINK).total_s == pytest.approx(plan.predicted_latency_s)
    ends = [sum(counts[:i + 1]) for i in range(3)]
    assert plan.token_ranges == tuple(TokenRange(i, e - c, e) for i, (c, e) in enumerate(zip(counts, ends)))
    assert Plan.from_json(plan.to_json()).token_ranges == plan.token_ranges

    embedded: dict[int, list[tuple[int, int, int]]] = {}
    real_embed = model.embed

    def recording_embed(part, start, end):
        hidden = real_embed(part, start, end)  # (B, n_own, d)
        embedded.setdefault(threading.get_ident(), []).append((start, end, hidden.shape[1]))
        return hidden

    model.embed = recording_embed

    def rank_fn(ctx, exchanger):
        transform = PositionWise(model, ctx, get_codec(plan.codec), exchanger=exchanger)
        split, parts = transform.split(batch, plan.token_ranges) if ctx.is_root else (None, None)
        if ctx.is_root:  # what the engine sends its workers passes the control schema
            validate_control(_infer_message(plan, split))
        header = exchanger.broadcast_json(split)  # stands in for the engine's control message
        exchanger.stats.per_kind_messages.clear()
        outputs = transform.forward(None if not ctx.is_root else batch, header=header, parts=parts)
        return outputs, embedded[threading.get_ident()], dict(exchanger.stats.per_kind_messages)

    results = LoopbackGroup(3).run(rank_fn)
    for rank, (_, calls, messages) in enumerate(results):
        r = plan.token_ranges[rank]
        assert calls == [(r.start, r.end, r.num_tokens)], (rank, calls)
        assert "control" not in messages, messages  # the transform broadcast no header of its own
    with torch.no_grad():
        reference = model(batch)
    for key, value in results[0][0].items():
        assert torch.allclose(value, reference[key], atol=1e-5), key


def test_the_standalone_split_is_the_same_splitter():
    """`PositionWise.forward(inputs, shares)` (edgeprism run, evaluations, benchmarks) splits with `apportion`
    too, and broadcasts its one header itself."""
    assert tuple(r.num_tokens for r in split_tokens(37, (0.5, 0.3, 0.2))) == apportion(37, (0.5, 0.3, 0.2))
    model = build_model("bert-tiny-test")
    batch = synthetic_inputs(model.config, 2, seq_len=29, seed=4)

    def rank_fn(ctx, exchanger):
        PositionWise(model, ctx, exchanger=exchanger).forward(batch if ctx.is_root else None, (0.5, 0.3, 0.2))
        return exchanger.stats.per_kind_messages.get("control", 0)

    assert LoopbackGroup(3).run(rank_fn) == [1, 1, 1]


def test_the_plan_carries_its_ranges_through_json():
    plan = Plan(mode="distributed", ranks=(0, 1, 2), token_shares=(0.5, 0.3, 0.2), token_counts=(19, 11, 7),
                codec="fp32", cr=1, wire_dtype="fp32", predicted_latency_s=0.1, predicted_energy_j=1.0,
                energy_source="modelled", objective="latency", reason="test")
    assert [(r.start, r.end) for r in plan.token_ranges] == [(0, 19), (19, 30), (30, 37)]
    data = json.loads(plan.to_json())
    assert data["token_ranges"][2] == {"group_rank": 2, "start": 30, "end": 37}
    assert Plan.from_dict(data) == plan
    old = {k: v for k, v in data.items() if k != "token_ranges"}  # a plan written before the field
    assert Plan.from_dict(old) == plan
    data["token_ranges"][1]["end"] = 31
    with pytest.raises(ValueError, match="token_ranges .* disagrees"):
        Plan.from_dict(data)
    assert replace(plan, ranks=(0,), token_counts=(37,)).token_ranges == (TokenRange(0, 0, 37),)
    with pytest.raises(ValueError, match="2 token counts .* for 3 ranks"):
        replace(plan, token_counts=(19, 18))
    with pytest.raises(ValueError, match="at least one token"):
        replace(plan, token_counts=(37, 0, 0))


def _bad(split, **change):
    return {**split, **change}


@pytest.mark.parametrize("change, problem", [
    ({"ranges": [[0, 19], [19, 30]]}, "2 ranges and 3 parts for a plan of 3 ranks"),
    ({"ranges": [[0, 19], [20, 30], [30, 37]]}, "not contiguous"),
    ({"ranges": [[1, 19], [19, 30], [30, 37]]}, "not contiguous"),
    ({"ranges": [[0, 19.0], [19, 30], [30, 37]]}, "not contiguous"),
    ({"ranges": [[0, 19], [19, 30], [30, 38]]}, "not the plan's"),
    ({"ranges": [[0, 18], [18, 30], [30, 37]]}, "not the plan's"),
    ({"codec": "int8"}, "not the plan's 'fp32'"),
    ({"generate": -1}, "generate -1"),
    ({"gather_hidden": 1}, "gather_hidden must be bool"),
    ({"micro_batches": 0}, "micro_batches 0 is not in"),
    ({"parts": [{"x": [[2, 19], "torch.float64"]}] * 3}, "named tensor shapes"),
])
def test_the_infer_header_is_checked_against_its_plan(change, problem):
    plan = Plan(mode="distributed", ranks=(0, 1, 2), token_shares=(0.5, 0.3, 0.2), token_counts=(19, 11, 7),
                codec="fp32", cr=1, wire_dtype="fp32", predicted_latency_s=0.1, predicted_energy_j=1.0,
                energy_source="modelled", objective="latency", reason="test")
    split = {"request": 1, "ranges": [[0, 19], [19, 30], [30, 37]], "codec": "fp32", "gather_hidden": False,
             "generate": 0, "parts": [{"input_ids": [[2, n], "torch.int64"]} for n in (19, 11, 7)], "micro_batches": 1}
    assert validate_control(_infer_message(plan, split))["split"] == split
    with pytest.raises(ControlError, match=problem):
        validate_control(_infer_message(plan, _bad(split, **change)))
    message = _infer_message(plan, split)
    message["plan"]["token_counts"] = [19, 11]
    with pytest.raises(ControlError, match="not a plan"):
        validate_control(message)
