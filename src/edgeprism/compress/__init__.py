"""What ranks exchange each layer: the codec seam (`base`), value formats, Segment Means, names."""

from edgeprism.compress.base import Codec, IdentityCodec, WireSpec, pack, spec_nbytes, unpack
from edgeprism.compress.codecs import DEFAULT_MAX_ANCHORS, QuantizedCodec, SegmentMeansCodec, count_dtype
from edgeprism.compress.formats import FloatFormat, Int4GroupFormat, Int8ChannelFormat, Int8TokenFormat, ValueFormat
from edgeprism.compress.registry import (
                                         LOSSLESS_CODECS,
                                         codec_fingerprint,
                                         get_codec,
                                         is_lossless,
                                         list_codecs,
                                         list_formats,
                                         mean_nbytes,
                                         num_vectors,
                                         parse_codec_list,
                                         request_nbytes,
                                         traffic_ratio,
)

__all__ = [
                                         "DEFAULT_MAX_ANCHORS",
                                         "LOSSLESS_CODECS",
                                         "Codec",
                                         "FloatFormat",
                                         "IdentityCodec",
                                         "Int4GroupFormat",
                                         "Int8ChannelFormat",
                                         "Int8TokenFormat",
                                         "QuantizedCodec",
                                         "SegmentMeansCodec",
                                         "ValueFormat",
                                         "WireSpec",
                                         "codec_fingerprint",
                                         "count_dtype",
                                         "get_codec",
                                         "is_lossless",
                                         "list_codecs",
                                         "list_formats",
                                         "mean_nbytes",
                                         "num_vectors",
                                         "pack",
                                         "parse_codec_list",
                                         "request_nbytes",
                                         "spec_nbytes",
                                         "traffic_ratio",
                                         "unpack",
]
