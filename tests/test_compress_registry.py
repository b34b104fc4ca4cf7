"""Codec names: parsing, errors that name the fix, fingerprints, traffic ratios."""

from __future__ import annotations

import pytest
import torch

from edgeprism.compress import (
    Codec,
    IdentityCodec,
    Int4GroupFormat,
    Int8ChannelFormat,
    Int8TokenFormat,
    QuantizedCodec,
    SegmentMeansCodec,
    codec_fingerprint,
    get_codec,
    list_codecs,
    num_vectors,
    parse_codec_list,
    traffic_ratio,
)
from edgeprism.compress.formats import FloatFormat


@pytest.mark.parametrize("name, expected", [
    ("fp32", IdentityCodec(torch.float32)),
    ("FP16 ", IdentityCodec(torch.float16)),
    ("bf16", IdentityCodec(torch.bfloat16)),
    ("int8", QuantizedCodec(Int8TokenFormat())),
    ("int8s32", QuantizedCodec(Int8TokenFormat(torch.float32))),
    ("int8c", QuantizedCodec(Int8ChannelFormat())),
    ("int4", QuantizedCodec(Int4GroupFormat(32))),
    ("int4g64", QuantizedCodec(Int4GroupFormat(64))),
    ("sm1", SegmentMeansCodec(1)),
    ("sm4", SegmentMeansCodec(4)),
    ("sm4+fp32", SegmentMeansCodec(4)),
    ("sm4a", SegmentMeansCodec(4, max_anchors=2)),
    ("sm4a4", SegmentMeansCodec(4, max_anchors=4)),
    ("sm8+fp16", SegmentMeansCodec(8, values=FloatFormat(torch.float16))),
    ("sm4a+int8", SegmentMeansCodec(4, max_anchors=2, values=Int8TokenFormat())),
    ("sm2+int4g16", SegmentMeansCodec(2, values=Int4GroupFormat(16))),
])
def test_get_codec(name: str, expected: Codec) -> None:
    codec = get_codec(name)
    assert codec == expected
    assert isinstance(codec, Codec)
    assert get_codec(str(codec)) == codec  # canonical names parse back


@pytest.mark.parametrize("bad, message", [
    ("int8+sm4", "write sm4\\+int8"),
    ("int8+int4", "choose one"),
    ("sm4+sm2", "two Segment Means"),
    ("sm0", "ratio 0 must be >= 1"),
    ("sm1.5", "'1.5' is not a whole number"),
    ("sm-2", "'-2' is not a whole number"),
    ("sm", "needs a ratio"),
    ("sm4a0", "anchor slot count 0"),
    ("fp8", "unknown codec stage 'fp8'"),
    ("sm4+fp8", "unknown codec stage 'fp8'"),
    ("int4g0", "int4 group size 0"),
    ("int8g32", "only int4 takes a group size"),
    ("", "empty"),
    ("sm4+", "empty stage"),
    ("sm2+sm2+int8", "3 stages"),
])
def test_bad_names_raise_value_error_naming_value_and_fix(bad: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        get_codec(bad)
    if bad:
        assert repr(bad) in str(info.value) or bad.split("+")[0] in str(info.value)


def test_parse_codec_list() -> None:
    assert [c.name for c in parse_codec_list("fp16, int8,sm4 ,sm4a+int8")] == ["fp16", "int8", "sm4", "sm4a+int8"]
    with pytest.raises(ValueError, match="twice"):
        parse_codec_list("sm4,sm4+fp32")
    with pytest.raises(ValueError, match="empty entry"):
        parse_codec_list("fp16,,int8")
    with pytest.raises(ValueError, match="empty"):
        parse_codec_list(" ")
    with pytest.raises(ValueError, match="int8\\+sm4"):
        parse_codec_list("fp16,int8+sm4")


def test_list_codecs_all_parse_to_themselves() -> None:
    names = list_codecs()
    assert len(names) == len(set(names))
    for name in names:
        assert get_codec(name).name == name


def test_fingerprint_is_stable_and_distinguishes_settings() -> None:
    prints = {name: codec_fingerprint(get_codec(name)) for name in list_codecs() + ["int8s32", "sm4a4", "int4g64"]}
    assert len(set(prints.values())) == len(prints)
    assert prints["sm4a+int8"] == ("edgeprism-codec/1:SegmentMeansCodec(ratio=4,max_anchors=2,"
                                   "values=Int8TokenFormat(scale_dtype=float16))")
    assert codec_fingerprint(get_codec("fp16")) == "edgeprism-codec/1:IdentityCodec(dtype=float16)"
    assert codec_fingerprint(get_codec("sm4+fp32")) == prints["sm4"]


def test_traffic_ratio_and_num_vectors() -> None:
    assert traffic_ratio(get_codec("fp32"), 2, 128, 768) == 1.0
    assert traffic_ratio(get_codec("sm1"), 2, 128, 768) == 1.0
    # fp16: half the values, the same 1-byte mask
    assert traffic_ratio(get_codec("fp16"), 1, 128, 768) == (128 * 768 * 2 + 128) / (128 * 768 * 4 + 128)
    # CR 128 on 128 tokens: one mean + one count byte against 128 tokens + 128 mask bytes
    assert traffic_ratio(get_codec("sm128"), 1, 128, 768) == 1 / 128
    # int8: 1 byte per value + fp16 scale + mask byte per token
    assert traffic_ratio(get_codec("int8"), 1, 128, 768) == (768 + 2 + 1) / (768 * 4 + 1)
    assert num_vectors(get_codec("fp16"), 13) == 13
    assert num_vectors(get_codec("sm4"), 13) == 4
    assert num_vectors(get_codec("sm4a"), 13) == 6
