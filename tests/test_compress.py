"""Codec family: wire contract, byte counts, round-trip error bounds, Segment Means semantics."""

from __future__ import annotations

import math

import pytest
import torch

from edgeprism.compress import (
    IdentityCodec,
    Int4GroupFormat,
    Int8ChannelFormat,
    Int8TokenFormat,
    QuantizedCodec,
    SegmentMeansCodec,
    get_codec,
    list_codecs,
    pack,
    spec_nbytes,
    unpack,
)

SIZES = [(1, 1, 1), (1, 7, 5), (2, 13, 70), (3, 16, 64), (2, 9, 33)]  # odd n, odd d, d not a multiple of 32
NAMES = list_codecs() + ["sm1", "sm3a4+int4g16", "int8s32", "int8cs32", "int4s32", "sm5a1+bf16", "sm300+int8c"]


def _inputs(batch: int, n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, n, d, generator=gen) * 3
    valid = torch.ones(batch, n, dtype=torch.bool)
    for b in range(1, batch):  # different padding per row
        valid[b, max(1, n - 2 * b):] = False
    anchor = torch.zeros(batch, n, dtype=torch.bool)
    anchor[:, 0] = True
    anchor[:, n - 1] = True
    return hidden, valid, anchor


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", SIZES)
def test_wire_matches_spec_and_bytes_are_exact(name: str, size: tuple[int, int, int]) -> None:
    codec = get_codec(name)
    hidden, valid, anchor = _inputs(*size)
    wire = codec.encode(hidden, valid, anchor)
    spec = codec.wire_spec(*size)
    assert [(tuple(t.shape), t.dtype) for t in wire] == [(tuple(s), dt) for s, dt in spec]
    assert codec.nbytes(*size) == spec_nbytes(spec) == sum(t.numel() * t.element_size() for t in wire)
    buffer = pack(wire)
    assert buffer.dtype == torch.uint8 and buffer.numel() == codec.nbytes(*size)
    # receivers pad to the largest rank's length: trailing bytes must not matter
    padded = torch.cat([buffer, torch.full((11,), 255, dtype=torch.uint8)])
    vectors, counts = codec.decode(unpack(padded, spec))
    direct_vectors, direct_counts = codec.decode(wire)
    assert torch.equal(vectors, direct_vectors) and torch.equal(counts, direct_counts)
    batch, n, d = size
    assert vectors.dtype == counts.dtype == torch.float32
    assert vectors.shape == (batch, codec.num_vectors(n), d) and counts.shape == (batch, codec.num_vectors(n))
    # every real token is accounted for exactly once
    assert torch.equal(counts.sum(dim=1), valid.sum(dim=1).to(torch.float32))
    assert str(codec) == codec.name == get_codec(codec.name).name


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16"])
def test_float_names_are_identity(name: str) -> None:
    codec = get_codec(name)
    assert isinstance(codec, IdentityCodec)
    hidden, valid, _ = _inputs(2, 9, 33)
    vectors, counts = codec.decode(codec.encode(hidden, valid))
    tol = {"fp32": 0.0, "fp16": 2**-11, "bf16": 2**-8}[name]
    assert torch.all((vectors - hidden).abs() <= tol * hidden.abs() + 1e-30)
    assert torch.equal(counts, valid.float())


def test_int8_per_token_error_bound() -> None:
    hidden, valid, _ = _inputs(2, 13, 70)
    codec = QuantizedCodec(Int8TokenFormat())
    vectors, _ = codec.decode(codec.encode(hidden, valid))
    absmax = hidden.abs().amax(dim=-1, keepdim=True)
    err = (vectors - hidden).abs()[valid]
    bound = (absmax / 127 * (0.5 + 2**-10)).expand_as(hidden)[valid]  # half a step, plus fp16 scale rounding
    assert torch.all(err <= bound)
    assert torch.all(vectors[~valid] == 0)  # padding is zeroed, not sent


def test_int8_per_channel_handles_outlier_dimension() -> None:
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 32, 64, generator=gen) * 0.5
    hidden[..., 7] = 80.0 + torch.randn(1, 32, generator=gen)  # BERT-style outlier channel
    valid = torch.ones(1, 32, dtype=torch.bool)
    per_channel = QuantizedCodec(Int8ChannelFormat())
    per_token = QuantizedCodec(Int8TokenFormat())
    err_c = (per_channel.decode(per_channel.encode(hidden, valid))[0] - hidden).abs()
    err_t = (per_token.decode(per_token.encode(hidden, valid))[0] - hidden).abs()
    channel_absmax = hidden.abs().amax(dim=1, keepdim=True)
    assert torch.all(err_c <= channel_absmax / 127 * (0.5 + 2**-10))
    others = [c for c in range(64) if c != 7]
    assert err_c[..., others].mean() < err_t[..., others].mean() / 10


def test_int4_group_error_bound_and_odd_sizes() -> None:
    for d, group in [(70, 32), (33, 32), (5, 2), (64, 16), (1, 32)]:
        hidden, valid, _ = _inputs(2, 5, d)
        codec = QuantizedCodec(Int4GroupFormat(group_size=group))
        wire = codec.encode(hidden, valid)
        assert wire[0].shape[-1] == math.ceil(d / 2) and wire[1].shape[-1] == math.ceil(d / group)
        vectors, _ = codec.decode(wire)
        assert vectors.shape == hidden.shape
        pad = math.ceil(d / group) * group - d
        groups = torch.nn.functional.pad(hidden * valid.unsqueeze(-1), (0, pad)).view(2, 5, -1, group)
        absmax = groups.abs().amax(dim=-1, keepdim=True).expand_as(groups).reshape(2, 5, -1)[..., :d]
        assert torch.all((vectors - hidden * valid.unsqueeze(-1)).abs() <= absmax / 7 * (0.5 + 2**-10))


def test_zero_input_decodes_to_zero() -> None:
    hidden = torch.zeros(1, 4, 8)
    valid = torch.ones(1, 4, dtype=torch.bool)
    for name in ["int8", "int8c", "int4", "sm2+int8", "sm2a+int4"]:
        codec = get_codec(name)
        vectors, _ = codec.decode(codec.encode(hidden, valid))
        assert torch.equal(vectors, torch.zeros_like(vectors)), name


# ---- Segment Means ----------------------------------------------------------------------------


def _reference_means(hidden, valid, ratio, taken=None):
    """Loop version of docs/ARCHITECTURE.md rule 1, for one row."""
    means, counts = [], []
    for start in range(0, hidden.shape[0], ratio):
        keep = [i for i in range(start, min(start + ratio, hidden.shape[0]))
                if valid[i] and (taken is None or i not in taken)]
        counts.append(len(keep))
        means.append(hidden[keep].mean(dim=0) if keep else torch.zeros(hidden.shape[1]))
    return torch.stack(means), torch.tensor(counts, dtype=torch.float32)


@pytest.mark.parametrize("ratio", [1, 2, 3, 4, 7, 16])
def test_segment_means_match_loop_reference(ratio: int) -> None:
    hidden, valid, _ = _inputs(3, 13, 10)
    valid[0, 5] = False  # a hole in the middle of a row too
    codec = SegmentMeansCodec(ratio)
    vectors, counts = codec.decode(codec.encode(hidden, valid))
    assert vectors.shape == (3, math.ceil(13 / ratio), 10)
    for b in range(3):
        ref_means, ref_counts = _reference_means(hidden[b], valid[b], ratio)
        torch.testing.assert_close(vectors[b], ref_means, rtol=1e-6, atol=1e-6)
        assert torch.equal(counts[b], ref_counts)


def test_last_segment_shorter_and_masked_segments() -> None:
    hidden = torch.arange(10, dtype=torch.float32).view(1, 10, 1).expand(2, 10, 3).clone()
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 4:] = False  # row 1: segments 1 and 2 are all padding
    vectors, counts = get_codec("sm4").decode(get_codec("sm4").encode(hidden, valid))
    assert counts.tolist() == [[4, 4, 2], [4, 0, 0]]
    assert vectors[0, :, 0].tolist() == [1.5, 5.5, 8.5]  # last segment: tokens 8, 9
    assert torch.equal(vectors[1, 1:], torch.zeros(2, 3))


def test_fewer_tokens_than_ratio_is_one_segment() -> None:
    hidden, valid, _ = _inputs(2, 3, 6)
    codec = get_codec("sm8")
    assert codec.wire_spec(2, 3, 6)[0][0] == (2, 1, 6)
    vectors, counts = codec.decode(codec.encode(hidden, valid))
    assert counts.tolist() == [[3], [1]]
    torch.testing.assert_close(vectors[0, 0], hidden[0].mean(dim=0))
    torch.testing.assert_close(vectors[1, 0], hidden[1, 0])


def test_sm1_equals_identity_fp32() -> None:
    hidden, valid, _ = _inputs(3, 9, 33)
    sm1, fp32 = get_codec("sm1"), get_codec("fp32")
    v_sm, c_sm = sm1.decode(sm1.encode(hidden, valid))
    v_id, c_id = fp32.decode(fp32.encode(hidden, valid))
    assert torch.equal(c_sm, c_id)
    assert torch.equal(v_sm[valid], v_id[valid])
    assert torch.equal(v_sm[~valid], torch.zeros_like(v_sm[~valid]))  # masked: count 0, zero vector
    assert sm1.nbytes(3, 9, 33) == fp32.nbytes(3, 9, 33)


def test_counts_dtype_grows_with_ratio() -> None:
    assert get_codec("sm255").wire_spec(1, 300, 4)[-1][1] == torch.uint8
    assert get_codec("sm256").wire_spec(1, 300, 4)[-1][1] == torch.int16
    assert get_codec("sm40000").wire_spec(1, 50000, 2)[-1][1] == torch.int32
    codec = get_codec("sm300")
    hidden = torch.ones(1, 600, 2)
    _, counts = codec.decode(codec.encode(hidden, torch.ones(1, 600, dtype=torch.bool)))
    assert counts.tolist() == [[300, 300]]


def test_composition_quantises_means_counts_exact() -> None:
    hidden, valid, anchor = _inputs(2, 13, 70)
    exact = SegmentMeansCodec(4, max_anchors=2)
    quant = get_codec("sm4a+int8")
    assert quant == SegmentMeansCodec(4, max_anchors=2, values=Int8TokenFormat())
    v_exact, c_exact = exact.decode(exact.encode(hidden, valid, anchor))
    v_quant, c_quant = quant.decode(quant.encode(hidden, valid, anchor))
    assert torch.equal(c_exact, c_quant)
    absmax = v_exact.abs().amax(dim=-1, keepdim=True)
    assert torch.all((v_quant - v_exact).abs() <= absmax / 127 * (0.5 + 2**-10))
    assert quant.nbytes(2, 13, 70) < exact.nbytes(2, 13, 70) / 3


# ---- anchors ----------------------------------------------------------------------------------


def test_anchors_travel_exact_and_leave_the_means() -> None:
    hidden, valid, _ = _inputs(2, 10, 6)
    anchor = torch.zeros(2, 10, dtype=torch.bool)
    anchor[0, 0] = anchor[0, 9] = True  # [CLS] ... [SEP]
    anchor[1, 3] = True  # one anchor: second slot unused
    codec = get_codec("sm4a")
    assert codec.max_anchors == 2
    vectors, counts = codec.decode(codec.encode(hidden, valid, anchor))
    assert vectors.shape == (2, 2 + 3, 6)
    assert torch.equal(vectors[0, :2], hidden[0, [0, 9]])
    assert counts[0].tolist() == [1, 1, 3, 4, 1]
    torch.testing.assert_close(vectors[0, 2], hidden[0, 1:4].mean(dim=0))
    torch.testing.assert_close(vectors[0, 4], hidden[0, 8])
    # row 1 has valid tokens 0..7 (see _inputs): anchor 3 exact, slot 2 empty
    assert torch.equal(vectors[1, 0], hidden[1, 3]) and torch.equal(vectors[1, 1], torch.zeros(6))
    assert counts[1].tolist() == [1, 0, 3, 4, 0]
    ref, _ = _reference_means(hidden[1], valid[1], 4, taken={3})
    torch.testing.assert_close(vectors[1, 2:], ref)


def test_extra_anchors_fall_back_into_their_segment_mean() -> None:
    hidden, valid, _ = _inputs(1, 8, 4)
    anchor = torch.zeros(1, 8, dtype=torch.bool)
    anchor[0, [1, 2, 5]] = True  # three anchors, one slot
    codec = get_codec("sm4a1")
    vectors, counts = codec.decode(codec.encode(hidden, valid, anchor))
    assert torch.equal(vectors[0, 0], hidden[0, 1])  # the first anchor takes the slot
    assert counts[0].tolist() == [1, 3, 4]  # anchors 2 and 5 stay in their segments
    torch.testing.assert_close(vectors[0, 1], hidden[0, [0, 2, 3]].mean(dim=0))
    torch.testing.assert_close(vectors[0, 2], hidden[0, 4:8].mean(dim=0))


def test_padding_anchor_ignored_and_none_means_no_anchors() -> None:
    hidden, valid, _ = _inputs(2, 6, 4)  # row 1: tokens 4, 5 are padding
    anchor = torch.zeros(2, 6, dtype=torch.bool)
    anchor[1, 5] = True  # flagged but padding
    codec = get_codec("sm2a")
    _, counts = codec.decode(codec.encode(hidden, valid, anchor))
    assert counts[1].tolist() == [0, 0, 2, 2, 0]
    _, counts_none = codec.decode(codec.encode(hidden, valid, None))
    assert torch.equal(counts_none, counts)
    assert codec.nbytes(2, 6, 4) == get_codec("sm2").nbytes(2, 6, 4) + 2 * 2 * (4 * 4 + 1)


def test_more_slots_than_tokens() -> None:
    hidden, valid, anchor = _inputs(1, 2, 3)
    codec = get_codec("sm4a4")
    vectors, counts = codec.decode(codec.encode(hidden, valid, anchor))
    assert counts.tolist() == [[1, 1, 0, 0, 0]]  # both tokens are anchors, the segment is empty
    assert torch.equal(vectors[0, :2], hidden[0])


def test_empty_rank_has_empty_wire() -> None:
    codec = get_codec("sm4a+int8")
    hidden = torch.zeros(2, 0, 8)
    wire = codec.encode(hidden, torch.zeros(2, 0, dtype=torch.bool), torch.zeros(2, 0, dtype=torch.bool))
    assert [(tuple(t.shape), t.dtype) for t in wire] == [(tuple(s), dt) for s, dt in codec.wire_spec(2, 0, 8)]
    _vectors, counts = codec.decode(wire)
    assert counts.tolist() == [[0, 0], [0, 0]]


def test_half_precision_input_is_averaged_in_float32() -> None:
    hidden = torch.full((1, 4096, 2), 1.0 + 2**-9, dtype=torch.float16)
    codec = get_codec("sm4096")
    vectors, _ = codec.decode(codec.encode(hidden, torch.ones(1, 4096, dtype=torch.bool)))
    assert vectors.dtype == torch.float32
    torch.testing.assert_close(vectors, torch.full((1, 1, 2), 1.0 + 2**-9))


def test_input_shape_errors_name_the_shapes() -> None:
    codec = get_codec("sm4")
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        codec.encode(torch.zeros(2, 6, 3), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch, tokens, hidden"):
        codec.encode(torch.zeros(6, 3), torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="integer >= 1"):
        SegmentMeansCodec(0)
    with pytest.raises(ValueError, match="integer >= 1"):
        SegmentMeansCodec(2.0)  # type: ignore[arg-type]


# ---- property check: random shapes, padding and anchors (seeded, no extra dependency) --------


@pytest.mark.parametrize("case", range(60))
def test_segment_means_property(case: int) -> None:
    gen = torch.Generator().manual_seed(1000 + case)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=gen))

    batch, n, d, ratio, slots = draw(1, 3), draw(0, 20), draw(1, 40), draw(1, 9), draw(0, 3)
    fmt = ["", "+fp16", "+int8", "+int8c", "+int4"][case % 5]
    hidden = torch.randn(batch, n, d, generator=gen)
    valid = torch.rand(batch, n, generator=gen) < 0.8
    anchor = torch.rand(batch, n, generator=gen) < 0.2
    codec = get_codec(f"sm{ratio}" + (f"a{slots}" if slots else "") + fmt)
    wire = codec.encode(hidden, valid, anchor)
    assert [(tuple(t.shape), t.dtype) for t in wire] == [(tuple(s), dt) for s, dt in codec.wire_spec(batch, n, d)]
    assert codec.nbytes(batch, n, d) == pack(wire).numel()
    vectors, counts = codec.decode(wire)
    assert torch.equal(counts.sum(dim=1), valid.sum(dim=1).float())
    exact = SegmentMeansCodec(ratio, max_anchors=slots)
    v_exact, c_exact = exact.decode(exact.encode(hidden, valid, anchor))
    assert torch.equal(counts, c_exact)
    for b in range(batch):
        flagged = [i for i in range(n) if anchor[b, i] and valid[b, i]][:slots]
        if n:
            ref_means, ref_counts = _reference_means(hidden[b], valid[b], ratio, taken=set(flagged))
            assert torch.equal(c_exact[b, slots:], ref_counts)
            torch.testing.assert_close(v_exact[b, slots:], ref_means, rtol=1e-5, atol=1e-5)
        assert torch.equal(v_exact[b, :len(flagged)], hidden[b, flagged])
        assert torch.all(c_exact[b, len(flagged):slots] == 0)
    tol = {"": 0.0, "+fp16": 1e-3, "+int8": 1e-2, "+int8c": 1e-2, "+int4": 0.1}[fmt]
    scale = v_exact.abs().amax() if v_exact.numel() else torch.tensor(0.0)
    assert torch.all((vectors - v_exact).abs() <= tol * scale + 1e-6)
