"""Token chunks (partition/overlapped.py): a one-row request's next-layer vectors leave in slices of the own tokens
as the block's tail produces them. Which codecs may (compress.base.splits_by_token), the rule every rank applies,
and the answers: the unchunked split's (the same bytes travel), at CR = 1 the single device's."""

from __future__ import annotations

import pytest
import torch

from edgeprism.comm.loopback import LoopbackGroup
from edgeprism.compress import get_codec
from edgeprism.compress.base import splits_by_token
from edgeprism.models.loading import build_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.partition.microbatch import row_slices
from edgeprism.partition.overlapped import chunks_for
from edgeprism.partition.ranges import TokenRange
from edgeprism.partition.transform import PositionWise

TOLERANCE = 1e-5


@pytest.mark.parametrize(("name", "splits"), [
    ("fp32", True), ("fp16", True), ("bf16", True), ("int8", True), ("int4", True), ("lb4o4r", True),
    ("int8c", False),  # one scale per channel across the tokens
    ("sm4", False), ("sm4+int8", False),  # segments cross a chunk's edge
    ("delta:lb8o4:lb3o4r", False),  # a session: state across layers
    ("kv30:int8", False)])  # keys and values of some tokens, projected before the send
def test_which_codecs_split_by_token(name, splits):
    assert splits_by_token(get_codec(name)) is splits


def test_a_split_encoded_in_pieces_is_the_whole_encoding():
    """What `splits_by_token` promises, checked on the codecs it admits: the pieces decode to the whole's vectors
    (up to float rounding: a rotated format's matrix product over fewer rows)."""
    torch.manual_seed(0)
    hidden, valid = torch.randn(2, 11, 32), torch.rand(2, 11) > 0.2
    for name in ("fp16", "int8", "int4", "lb4o4r"):
        codec = get_codec(name)
        whole, _ = codec.decode(codec.encode(hidden, valid))
        pieces = [codec.decode(codec.encode(hidden[:, s], valid[:, s]))[0] for s in row_slices(11, 3)]
        assert (torch.cat(pieces, dim=1) - whole).abs().max() <= 1e-6, name


def test_token_chunks_cover_the_tokens_in_order():
    assert row_slices(7, 3) == [slice(0, 2), slice(2, 4), slice(4, 7)]
    assert row_slices(5, 1) == [slice(0, 5)]


def test_the_rule_every_rank_applies():
    ranges = (TokenRange(0, 0, 99), TokenRange(1, 99, 197))
    int8, sm4 = get_codec("int8"), get_codec("sm4")
    assert chunks_for(int8, ranges, micro_batches=1, token_chunks=2) == 2
    assert chunks_for(int8, ranges, micro_batches=2, token_chunks=2) == 1  # micro-batches hide the wire already
    assert chunks_for(sm4, ranges, micro_batches=1, token_chunks=2) == 1
    assert chunks_for(int8, ranges, micro_batches=1, token_chunks=1) == 1
    tiny = (TokenRange(0, 0, 2), TokenRange(1, 2, 9))
    assert chunks_for(int8, tiny, micro_batches=1, token_chunks=4) == 2  # at most the smallest rank's tokens


@pytest.mark.parametrize(("name", "codec", "world", "chunks"), [
    ("vit-tiny-test", "fp32", 2, 2), ("dinov2-tiny-test", "fp32", 3, 3), ("bert-tiny-test", "fp32", 2, 4),
    ("vit-tiny-test", "int8", 2, 3), ("bert-tiny-test", "lb4o4r", 3, 2)])
def test_chunked_exchanges_give_the_unchunked_answer(name, codec, world, chunks):
    """One row (so one micro-batch): `chunks` exchanges per layer instead of one, the same bytes in all, the same
    answer; at CR = 1 the single device's."""
    model = build_model(name)
    inputs = synthetic_inputs(model.config, 1, seed=7)
    shares = (0.6, 0.4) if world == 2 else (0.5, 0.3, 0.2)

    def run(token_chunks):
        def rank_fn(ctx, exchanger):
            engine = PositionWise(model, ctx, get_codec(codec), exchanger=exchanger, token_chunks=token_chunks)
            out = engine.forward(inputs if ctx.is_root else None, shares=shares)
            stats = exchanger.stats
            return out, stats.per_kind_messages.get("layer", 0), stats.per_kind_nbytes.get("layer", 0)
        return LoopbackGroup(world).run(rank_fn)

    whole, chunked = run(1), run(chunks)
    layers = model.config.num_layers
    for (out, messages, nbytes), (want, whole_messages, whole_nbytes) in zip(chunked, whole):
        assert whole_messages == layers and messages == layers * chunks
        assert abs(nbytes - whole_nbytes) <= layers * chunks * world * 8  # padding to each chunk's largest
        for key in want or {}:
            assert out is not None and (out[key] - want[key]).abs().max() <= TOLERANCE, key
    if codec == "fp32":
        with torch.no_grad():
            local = model(inputs)
        assert (chunked[0][0]["mean"] - local["mean"]).abs().max() <= TOLERANCE


def test_ranks_with_other_chunk_counts_refuse_before_any_request():
    model = build_model("vit-tiny-test")

    def rank_fn(ctx, exchanger):
        engine = PositionWise(model, ctx, exchanger=exchanger, token_chunks=1 + ctx.group_rank)
        engine.verify_peers()

    with pytest.raises(Exception, match="settings"):
        LoopbackGroup(2).run(rank_fn)


def test_token_chunks_need_one_at_least():
    model = build_model("vit-tiny-test")
    with pytest.raises(ValueError, match="token_chunks must be >= 1, got 0"):
        LoopbackGroup(1).run(lambda ctx, exchanger: PositionWise(model, ctx, exchanger=exchanger, token_chunks=0))
