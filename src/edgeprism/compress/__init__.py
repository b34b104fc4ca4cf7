"""What ranks exchange each layer: the codec seam (`base`), value formats, Segment Means, names."""

from edgeprism.compress.base import Codec, IdentityCodec, WireSpec, pack, spec_nbytes, unpack
from edgeprism.compress.codecs import DEFAULT_MAX_ANCHORS, QuantizedCodec, SegmentMeansCodec, count_dtype
from edgeprism.compress.formats import FloatFormat, Int4GroupFormat, Int8ChannelFormat, Int8TokenFormat, ValueFormat
from edgeprism.compress.registry import (codec_fingerprint, get_codec, list_codecs, list_formats, mean_nbytes,
                                         num_vectors, parse_codec_list, request_nbytes, traffic_ratio)

__all__ = [
    "Codec", "IdentityCodec", "WireSpec", "pack", "spec_nbytes", "unpack",
    "DEFAULT_MAX_ANCHORS", "QuantizedCodec", "SegmentMeansCodec", "count_dtype",
    "FloatFormat", "Int4GroupFormat", "Int8ChannelFormat", "Int8TokenFormat", "ValueFormat",
    "codec_fingerprint", "get_codec", "list_codecs", "list_formats", "mean_nbytes", "num_vectors",
    "parse_codec_list", "request_nbytes", "traffic_ratio",
]
