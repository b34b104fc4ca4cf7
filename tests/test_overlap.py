"""Exchange overlapped with compute (partition/overlap.py): the two-part attention with its log-sum-exp
merge equals attention over the union of the key sets, so the overlapped split equals the plain one (and,
at CR = 1, one device: tests/test_partition.py runs the self-check, whose transform overlaps by default)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgeprism.comm.loopback import LoopbackGroup
from edgeprism.compress import get_codec
from edgeprism.models.base import KVExchangeBlock, SplitBlock, SplitKVBlock
from edgeprism.models.common import key_padding_bias
from edgeprism.models.config import get_config
from edgeprism.models.loading import build_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.partition import overlap
from edgeprism.partition.attend import block_with_remote, own_key_bias, remote_key_bias
from edgeprism.partition.overlap import OwnPart, attention_part, merge_parts
from edgeprism.partition.transform import PositionWise
from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile
from edgeprism.runtime import EngineConfig, launch_local

TOLERANCE = 1e-5


@pytest.mark.parametrize("fused", [True, False])
def test_two_parts_merged_equal_attention_over_the_union(fused, monkeypatch):
    if not fused:  # the plain-math path (non-CPU devices) must agree with the fused CPU kernel's
        monkeypatch.setattr(overlap, "_FUSED_CPU", None)
    torch.manual_seed(0)
    batch, heads, num_q, num_own, num_remote, head_dim = 3, 4, 7, 7, 5, 16
    q = torch.randn(batch, heads, num_q, head_dim)
    k_own, v_own = torch.randn(2, batch, heads, num_own, head_dim)
    k_rem, v_rem = torch.randn(2, batch, heads, num_remote, head_dim)
    valid = torch.rand(batch, num_own) > 0.3
    valid[:, 0] = True
    own_bias = key_padding_bias(valid, torch.float32).expand(batch, 1, num_q, num_own)
    counts = torch.tensor([[3, 1, 0, 2, 4]] * batch, dtype=torch.float32)  # one masked vector, size-aware logits
    rem_bias = remote_key_bias(counts, True, torch.float32)  # (B, 1, 1, S)
    merged = merge_parts(attention_part(q, k_own, v_own, own_bias, 0.25),
                         attention_part(q, k_rem, v_rem, rem_bias, 0.25))
    bias = torch.cat([own_bias, rem_bias.expand(batch, 1, num_q, num_remote)], dim=-1)
    union = F.scaled_dot_product_attention(q, torch.cat([k_own, k_rem], 2), torch.cat([v_own, v_rem], 2),
                                           attn_mask=bias, scale=0.25)
    assert (merged - union).abs().max() <= TOLERANCE
    nothing = attention_part(q, k_rem[:, :, :0], v_rem[:, :, :0], None, 0.25)  # an empty part changes nothing
    alone = attention_part(q, k_own, v_own, own_bias, 0.25)
    assert (merge_parts(alone, nothing) - alone[0]).abs().max() <= TOLERANCE


@pytest.mark.parametrize("name", ["dinov2-tiny-test", "bert-tiny-test", "vit-tiny-test"])
def test_own_part_then_remote_equals_the_block(name):
    model = build_model(name)
    block = model.block_list()[1]
    assert isinstance(block, SplitBlock)
    torch.manual_seed(1)
    d = model.config.hidden_size
    hidden, remote = torch.randn(2, 9, d), torch.randn(2, 4, d)
    valid = torch.ones(2, 9, dtype=torch.bool)
    own_bias = own_key_bias(valid, 0, 9, False, torch.float32)
    rem_bias = remote_key_bias(torch.tensor([[2.0, 2, 1, 0]] * 2), True, torch.float32)
    with torch.no_grad():
        kv_in = block.kv_input(hidden)
        got, kv = OwnPart(block, kv_in, own_bias).finish(hidden, remote, rem_bias, keep_kv=True)
        full_kv = block.attn.project_kv(torch.cat([kv_in, remote], dim=1))
        bias = torch.cat([own_bias, rem_bias.expand(2, 1, 9, -1)], dim=-1)
        want = block(hidden, bias=bias, kv=full_kv)
    assert (got - want).abs().max() <= TOLERANCE
    assert kv is not None and (kv[0] - full_kv[0]).abs().max() <= TOLERANCE


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("num_remote", [0, 6])
def test_a_rotary_decoder_block_in_causal_parts_equals_the_explicit_mask(fused, num_remote, monkeypatch):
    """A decoder rank with no padding: own keys on the fused causal kernel + the earlier ranks' keys, merged,
    equals the block over [own ; remote] with the explicit causal bias (rank 0 receives nothing)."""
    if not fused:
        monkeypatch.setattr(overlap, "_FUSED_CPU", None)
    model = build_model("llama-tiny")
    block = model.block_list()[1]
    assert isinstance(block, SplitKVBlock) and isinstance(block, KVExchangeBlock)
    torch.manual_seed(2)
    start, num_own = num_remote, 8
    hidden = torch.randn(2, num_own, model.config.hidden_size)
    positions = torch.arange(start, start + num_own)
    with torch.no_grad():
        remote = block.wire_kv(torch.randn(2, num_remote, model.config.hidden_size), torch.arange(num_remote))
        valid = torch.ones(2, num_own, dtype=torch.bool)
        own_bias = own_key_bias(valid, start, start + num_own, True, torch.float32)
        counts = torch.ones(2, num_remote)
        args = (block, hidden, own_bias, remote, counts, True, "normed", None, positions)
        want, want_kv, _ = block_with_remote(*args, own_causal_square=False)
        got, got_kv, _ = block_with_remote(*args, own_causal_square=True)
    assert (got - want).abs().max() <= TOLERANCE
    assert all((a - b).abs().max() <= TOLERANCE for a, b in zip(got_kv, want_kv))  # the decode cache alike


@pytest.mark.parametrize("codec", ["fp32", "sm4+int8", "delta:lb8o4:lb3o4r"])
def test_overlapped_split_equals_the_plain_split(codec):
    model = build_model("dinov2-tiny-test")
    inputs = synthetic_inputs(model.config, 2, seed=3)

    def run(overlapped):
        def rank_fn(ctx, exchanger):
            engine = PositionWise(model, ctx, get_codec(codec), exchanger=exchanger, overlap=overlapped)
            assert engine.overlap == overlapped
            return engine.forward(inputs if ctx.is_root else None, shares=(0.6, 0.4))
        return LoopbackGroup(2).run(rank_fn)[0]

    plain, overlapped = run(False), run(True)
    for key in plain:
        assert (plain[key] - overlapped[key]).abs().max() <= TOLERANCE, key
    if codec == "fp32":
        local = model(inputs)
        assert (overlapped["mean"] - local["mean"]).abs().max() <= TOLERANCE


def test_decoders_run_unsplit():
    model = build_model("gpt2-tiny-test")

    def rank_fn(ctx, exchanger):
        return PositionWise(model, ctx, exchanger=exchanger, overlap=True).overlap

    assert LoopbackGroup(2).run(rank_fn) == [False, False]  # causal: vectors only travel forward, nothing to hide


def test_the_timeline_has_every_layer_and_adds_up():
    model = build_model("vit-tiny-test")
    inputs = synthetic_inputs(model.config, 2, seed=4)

    def rank_fn(ctx, exchanger):
        engine = PositionWise(model, ctx, get_codec("fp16"), exchanger=exchanger)
        engine.forward(inputs if ctx.is_root else None)
        return engine.timeline

    for timeline in LoopbackGroup(2).run(rank_fn):
        assert [t.layer for t in timeline.layers] == list(range(model.config.num_layers))
        for t in timeline.layers:
            assert min(t.encode_s, t.exchange_s, t.wait_s, t.compute_s) >= 0.0 and t.compute_s > 0.0, t
        totals = timeline.totals()
        assert set(totals) == {"encode_s", "exchange_s", "wait_s", "compute_s"}
        assert [row["layer"] for row in timeline.to_rows()] == list(range(model.config.num_layers))


@pytest.mark.parametrize(("name", "codec", "world", "batch"), [
    ("dinov2-tiny-test", "fp32", 2, 3), ("vit-tiny-test", "fp32", 3, 4), ("bert-tiny-test", "fp32", 2, 5),
    ("dinov2-tiny-test", "delta:lb8o4:lb3o4r", 2, 4)])
def test_micro_batches_equal_the_whole_batch(name, codec, world, batch):
    """Two micro-batches (partition/microbatch.py) give the whole batch's answer: at CR = 1 the single device's."""
    model = build_model(name)
    inputs = synthetic_inputs(model.config, batch, seed=5)
    shares = (0.6, 0.4) if world == 2 else (0.5, 0.3, 0.2)

    def run(micro_batches):
        def rank_fn(ctx, exchanger):
            engine = PositionWise(model, ctx, get_codec(codec), exchanger=exchanger, micro_batches=micro_batches)
            out = engine.forward(inputs if ctx.is_root else None, shares=shares)
            return out, [t.layer for t in engine.timeline.layers]
        return LoopbackGroup(world).run(rank_fn)

    whole, split = run(1), run(2)
    for (out, layers), (want, _) in zip(split, whole):
        assert layers == list(range(model.config.num_layers))
        for key in want or {}:
            assert out is not None and (out[key] - want[key]).abs().max() <= TOLERANCE, key
    if codec == "fp32":
        local = model(inputs)
        assert (split[0][0]["mean"] - local["mean"]).abs().max() <= TOLERANCE


def test_micro_batches_need_one_at_least():
    model = build_model("vit-tiny-test")
    with pytest.raises(ValueError, match="micro_batches must be >= 1, got 0"):
        LoopbackGroup(1).run(lambda ctx, exchanger: PositionWise(model, ctx, exchanger=exchanger, micro_batches=0))


def test_the_engine_runs_micro_batches_as_one_batch():
    """EngineConfig.micro_batches reaches the workers in the request header; answers stay the local model's."""
    config = get_config("vit-tiny-test")
    profile = synthetic_profile("vit-tiny-test", bandwidth_bps=1e9, latency_s=1e-4, seconds_per_image=3000,
                                codecs=synthetic_codecs(config.hidden_size)[:1])  # fp32 only: exact
    engine_config = EngineConfig(micro_batches=2, learn_compute=False, learn_link=False, learn_speeds=False)
    inputs = synthetic_inputs(config, 3, seed=6)
    with launch_local(2, "vit-tiny-test", profile, config=engine_config) as engine:
        result = engine.infer(inputs)
        assert result.metrics.mode == "distributed", result.metrics.plan
        with torch.no_grad():
            reference = engine.model(inputs)
        for key, value in result.outputs.items():
            assert (value - reference[key]).abs().max() <= TOLERANCE, key
