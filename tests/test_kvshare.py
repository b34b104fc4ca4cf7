"""A share of each rank's tokens sent as keys and values (compress/kvshare.py): at fp32 the same answers as the
one-device model (keys and values are linear in what a hidden-state exchange sends), uneven ranks and micro-batches
included; its names, byte counts and refusals."""

from __future__ import annotations

import pytest
import torch

from edgeprism.comm.loopback import LoopbackGroup
from edgeprism.compress import get_codec
from edgeprism.compress.kvshare import KVShareCodec, heads_to_rows, kv_message, kv_split, rows_to_heads
from edgeprism.compress.registry import is_lossless
from edgeprism.models.loading import build_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.partition.transform import PositionWise

TOLERANCE = 1e-5


def run_split(model, inputs, codec: str, world: int, shares=None, micro_batches: int = 1):
    def rank_fn(ctx, exchanger):
        engine = PositionWise(model, ctx, get_codec(codec), exchanger=exchanger, micro_batches=micro_batches)
        out = engine.forward(inputs if ctx.is_root else None, shares)
        return out, exchanger.stats.per_kind_nbytes.get("layer", 0)

    return LoopbackGroup(world).run(rank_fn)


@pytest.mark.parametrize("name,codec,world,shares,micro_batches", [
    ("vit-tiny-test", "kv50:fp32", 2, None, 1),
    ("vit-tiny-test", "kv100:fp32", 3, (0.5, 0.3, 0.2), 2),
    ("bert-tiny-test", "kv25:fp32", 4, (0.1, 0.4, 0.2, 0.3), 1),
    ("dinov2-tiny-test", "kv70:fp32", 3, None, 2),
])
def test_fp32_kv_share_equals_one_device(name, codec, world, shares, micro_batches):
    model = build_model(name)
    torch.manual_seed(0)
    inputs = synthetic_inputs(model.config, batch=3, seed=4)
    with torch.no_grad():
        reference = model(inputs)
    results = run_split(model, inputs, codec, world, shares, micro_batches)
    out = results[0][0]
    compared = [key for key in reference if key in out]
    assert compared, "the split returns the model's outputs"
    for key in compared:
        assert (out[key] - reference[key]).abs().max() <= TOLERANCE, key
    # against the plain hidden-state exchange, the share moves more bytes (keys and values are two vectors)
    plain = run_split(model, inputs, "fp32", world, shares, micro_batches)
    assert sum(r[1] for r in results) > sum(r[1] for r in plain)


def test_int8_kv_share_stays_close_and_its_bytes_match_the_codec():
    model = build_model("vit-tiny-test")
    inputs = synthetic_inputs(model.config, batch=2, seed=1)
    with torch.no_grad():
        reference = model(inputs)["pooled"]
    out = run_split(model, inputs, "kv50:int8", 2)[0][0]["pooled"]
    assert torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0) > 0.99
    codec = get_codec("kv50:int8")
    inner = get_codec("int8")
    d = model.config.hidden_size
    assert codec.nbytes(2, 10, d) == inner.nbytes(2, 15, d)  # 5 inputs + 5 keys + 5 values
    assert codec.num_vectors(10) == 10  # a receiver attends to every token once


def test_message_round_trip_keeps_inputs_keys_and_values_apart():
    codec = get_codec("kv40:fp32")
    assert isinstance(codec, KVShareCodec)
    torch.manual_seed(2)
    batch, heads, n, head_dim = 2, 3, 7, 4
    kv_in = torch.randn(batch, n, heads * head_dim)
    k, v = torch.randn(2, batch, heads, n, head_dim)
    valid = torch.rand(batch, n) > 0.2
    rows, rows_valid = kv_message(codec, kv_in, (k, v), valid)
    kept = codec.kv_tokens(n)  # 3 of 7
    assert kept == 3 and rows.shape == (batch, n + kept, heads * head_dim)
    decoded, counts = codec.decode(codec.encode(rows, rows_valid))
    inputs, in_counts, keys, values, kv_counts = kv_split(codec, decoded, counts, n)
    assert torch.equal(inputs, kv_in[:, :n - kept])
    assert torch.equal(rows_to_heads(keys, heads), k[:, :, n - kept:])
    assert torch.equal(rows_to_heads(values, heads), v[:, :, n - kept:])
    assert torch.equal(in_counts, valid[:, :n - kept].float()) and torch.equal(kv_counts, valid[:, n - kept:].float())
    assert torch.equal(rows_to_heads(heads_to_rows(k), heads), k)
    with pytest.raises(ValueError, match="cannot hold 8 tokens"):
        kv_split(codec, decoded, counts, 8)


def test_names_and_losslessness():
    assert get_codec(" KV50:INT8 ").name == "kv50:int8"
    assert is_lossless("kv25:fp16") and not is_lossless("kv25:int8")
    for bad, match in [("kv0:int8", "must be 1..100"), ("kv101:fp16", "must be 1..100"),
                       ("kv50:sm4", "must send every token"), ("kv50:delta:int8", "must send every token")]:
        with pytest.raises(ValueError, match=match):
            get_codec(bad)


@pytest.mark.parametrize("name,average,match", [
    ("gpt2-tiny-test", "normed", "do not split their attention"),
    ("vit-tiny-test", "residual", "averages the residual stream"),
])
def test_models_and_paths_that_cannot_use_it_are_refused_with_the_fix(name, average, match):
    model = build_model(name)
    with pytest.raises(ValueError, match=f"{match}.*use int8"):
        LoopbackGroup(1).run(lambda ctx, exchanger: PositionWise(model, ctx, get_codec("kv50:int8"),
                                                                 exchanger=exchanger, average=average))


def test_accounting_counts_the_projections_a_kv_share_spares():
    from edgeprism.models.config import get_config
    from edgeprism.plan.accounting import exchange_cost, layer_flops

    config = get_config("vit-base-patch16-224")
    d = config.hidden_size
    plain = exchange_cost(config, (99, 98), "int8", batch=2)
    shared = exchange_cost(config, (99, 98), "kv100:int8", batch=2)
    # every received token arrives projected: rank 0 skips 98 tokens' K and V, rank 1 99 tokens'
    spared = [plain.flops_per_layer_per_rank[p] - shared.flops_per_layer_per_rank[p] for p in range(2)]
    assert spared == [2 * 2 * 2 * 98 * d * d, 2 * 2 * 2 * 99 * d * d]
    assert shared.message_bytes_per_rank[0] > plain.message_bytes_per_rank[0]
    assert layer_flops(config, 10, 5, 1) == layer_flops(config, 10, 5, 1, num_remote_projected=5)


def test_the_refusal_rule_defaults_to_the_transforms_averaging():
    import inspect

    from edgeprism.partition.kvwire import kv_share_refusal
    from edgeprism.partition.transform import DEFAULT_AVERAGE

    assert inspect.signature(kv_share_refusal).parameters["average"].default == DEFAULT_AVERAGE
