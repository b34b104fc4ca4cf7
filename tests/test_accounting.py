"""Byte and FLOP accounting: the BERT-base figures of docs/ARCHITECTURE.md rule 9, flows, codec bytes, validation."""

from __future__ import annotations

import json

import pytest

from edgeprism.compress import get_codec
from edgeprism.models.config import get_config
from edgeprism.plan.accounting import ExchangeCost, exchange_cost, layer_flops, single_device_flops

BERT = get_config("bert-base")
GPT2 = get_config("gpt2-124m")


def test_design_figures_bert_base_256_tokens_two_ranks_cr128() -> None:
    cost = exchange_cost(BERT, (128, 128), 128)
    assert cost.remote_vectors_per_rank == (1, 1)
    assert cost.communication_saving_fraction * 100 == pytest.approx(99.2, abs=0.1)
    assert cost.compute_saving_fraction * 100 == pytest.approx(51.2, abs=0.1)
    # exact: one fp32 mean + one uint8 count against 128 tokens + 128 mask bytes, per rank and layer
    assert cost.message_bytes_per_rank == (768 * 4 + 1, 768 * 4 + 1)
    assert cost.bytes_per_request == 12 * 2 * (768 * 4 + 1)
    assert cost.full_exchange_bytes_per_request == 12 * 2 * 128 * (768 * 4 + 1)


def test_cr1_saves_no_communication_and_matches_identity_bytes() -> None:
    cost = exchange_cost(BERT, (128, 128), 1)
    assert cost.communication_saving_fraction == 0.0
    assert cost.bytes_per_request == exchange_cost(BERT, (128, 128), "fp32").bytes_per_request
    assert cost.remote_vectors_per_rank == (128, 128)
    # full exchange still saves the Q/MLP half, not the K/V work
    assert 0 < cost.compute_saving_fraction < exchange_cost(BERT, (128, 128), 128).compute_saving_fraction


def test_flop_convention_by_hand() -> None:
    d, m = 768, 3072
    own, remote = 128, 1
    kv = own + remote
    by_hand = 2 * (own * d * d + 2 * kv * d * d + 2 * own * kv * d + own * d * d + 2 * own * d * m)
    assert layer_flops(BERT, own, remote) == by_hand
    assert layer_flops(BERT, own, remote, batch=3) == 3 * by_hand
    assert single_device_flops(BERT, 256) == 12 * layer_flops(BERT, 256)
    cost = exchange_cost(BERT, (128, 128), 128, batch=2)
    assert cost.flops_per_rank == (12 * 2 * by_hand,) * 2
    assert cost.flops_single_device == 2 * single_device_flops(BERT, 256)


def test_codec_bytes_include_scales_counts_and_anchors() -> None:
    codec = get_codec("sm4a+int8")
    cost = exchange_cost(BERT, [100, 156], codec, batch=2)
    assert cost.codec == "sm4a+int8"
    assert cost.message_bytes_per_rank == (codec.nbytes(2, 100, 768), codec.nbytes(2, 156, 768))
    assert cost.message_bytes_per_rank[0] == 2 * (2 + 25) * (768 + 2 + 1)
    assert cost.remote_vectors_per_rank == (2 + 39, 2 + 25)
    assert cost.received_bytes_per_rank == cost.message_bytes_per_rank[::-1]
    assert cost.padded_allgather_bytes_per_layer == 2 * codec.nbytes(2, 156, 768)
    assert cost.bytes_per_request == 12 * sum(cost.message_bytes_per_rank)


def test_causal_flow_means_go_only_to_higher_ranks() -> None:
    shares = (100, 80, 120)
    gather = exchange_cost(GPT2, shares, "sm4")
    causal = exchange_cost(GPT2, shares, "sm4", flow="to_higher_ranks")
    sm4 = get_codec("sm4")
    assert causal.message_bytes_per_rank == (sm4.nbytes(1, 100, 768), sm4.nbytes(1, 80, 768), 0)
    first, second = sm4.nbytes(1, 100, 768), sm4.nbytes(1, 80, 768)
    assert causal.received_bytes_per_rank == (0, first, first + second)
    assert causal.remote_vectors_per_rank == (0, 25, 45)
    assert gather.remote_vectors_per_rank == (50, 55, 45)
    assert causal.bytes_per_request < gather.bytes_per_request
    assert causal.bytes_per_request == 12 * (sm4.nbytes(1, 100, 768) + sm4.nbytes(1, 80, 768))
    # the baseline follows the same flow, so c = 1 still saves nothing
    assert exchange_cost(GPT2, shares, 1, flow="to_higher_ranks").communication_saving_fraction == 0.0


def test_one_rank_is_the_single_device() -> None:
    cost = exchange_cost(BERT, (256,), "sm4")
    assert cost.bytes_per_request == 0 and cost.padded_allgather_bytes_per_layer == 0
    assert cost.flops_per_rank == (cost.flops_single_device,)
    assert cost.compute_saving_fraction == 0.0 and cost.communication_saving_fraction == 0.0


def test_json_round_trip_and_str() -> None:
    cost = exchange_cost(BERT, (128, 128), "sm8+fp16")
    assert ExchangeCost.from_dict(json.loads(cost.to_json())) == cost
    text = str(cost)
    assert "bert-base" in text and "sm8+fp16" in text and "128+128" in text


@pytest.mark.parametrize("kwargs, message", [
    ({"token_shares": (), "codec": 4}, "token shares"),
    ({"token_shares": (10, -1), "codec": 4}, "token shares"),
    ({"token_shares": (10, 10), "codec": 0}, "ratio 0 must be >= 1"),
    ({"token_shares": (10, 10), "codec": "int8+sm4"}, "sm4\\+int8"),
    ({"token_shares": (10, 10), "codec": 4, "batch": 0}, "batch 0"),
    ({"token_shares": (10, 10), "codec": 4, "flow": "ring"}, "'ring'"),
])
def test_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        exchange_cost(BERT, **kwargs)
