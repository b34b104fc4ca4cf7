"""Codec names: parse "sm4a+int8" into a codec, list the standard family, fingerprint settings.

Grammar (case-insensitive, surrounding spaces ignored)::

    codec   := format | sm | sm "+" format | delta
    delta   := "delta:" format { ":" format ["*" N] } ":" format | "delta:" format
                                      key frame in the first format at layer 0, then each layer's
                                      residual against the shared reconstruction: the middle formats
                                      for layers 1, 2, ... in order ("*N": N layers), the last one
                                      for every later layer (compress/delta.py; stateful per request)
    sm      := "sm" N [ "a" [K] ]     N >= 1 tokens per segment; "a": exact anchors, K >= 1 slots
                                      per row (default 2, DEFAULT_MAX_ANCHORS)
    format  := fp32 | fp16 | bf16     float wire
             | int8 | int8c           int8, one scale per token | per channel (fp16 scales)
             | int4 | int4g<G>        int4 in groups of 32 | G channels (fp16 scales)
             each int format takes a suffix "s32" for float32 scales (int8s32, int4g64s32)
             | lb<B>[o<K>][r]        B-bit codes (2..8) with one fp16 scale per token, K exact fp16
                                     outlier channels, "r": fixed rotation (compress/lowbit.py); alone,
                                     the valid mask travels as bits (PackedMaskCodec)

    kv<P>:<format>          P % (1..100) of each rank's tokens travel as their keys and values instead
                            of hidden states, the rest as before, all in <format> (compress/kvshare.py)
    tc:<12 hex>             calibrated on data (compress/calibrated.py): PCA rotation, bits per
                            component and layer; read from calibration_dir()/<digest>.safetensors

`fp32`/`fp16`/`bf16` alone are `IdentityCodec`; `sm1` decodes to the same values as `fp32`.
A codec outside the grammar is one module plus one `register_codec(name, factory)` line (docs/ADDING.md);
registered names are looked up before the grammar.
Segment Means comes first: its means are what the format then quantises; counts stay exact.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch

from edgeprism.compress.base import Codec, IdentityCodec
from edgeprism.compress.calibrated import NAME_PREFIX
from edgeprism.compress.calibrated_state import load_calibrated
from edgeprism.compress.codecs import DEFAULT_MAX_ANCHORS, QuantizedCodec, SegmentMeansCodec
from edgeprism.compress.delta import DeltaCodec
from edgeprism.compress.formats import FloatFormat, Int4GroupFormat, Int8ChannelFormat, Int8TokenFormat, ValueFormat
from edgeprism.compress.kvshare import NAME as KV_SHARE_NAME
from edgeprism.compress.kvshare import KVShareCodec
from edgeprism.compress.lowbit import LowBitFormat, PackedMaskCodec

FINGERPRINT_VERSION = 1
"""Bumped whenever a codec's wire layout changes, so ranks on different versions refuse each other."""

_STANDARD = ("fp32", "fp16", "bf16", "int8", "int8c", "int4",
             "sm2", "sm4", "sm8", "sm16", "sm2a", "sm4a", "sm8a", "sm16a",
             "sm4+fp16", "sm4+int8", "sm8+fp16", "sm8+int8", "sm2a+int8", "sm4a+int8", "sm8a+int8")

_SM = re.compile(r"sm(?P<ratio>[^a+]*)(?P<anchor>a(?P<slots>.*))?")
_INT_FORMAT = re.compile(r"(?P<kind>int8c|int8|int4)(?:g(?P<group>\d+))?(?P<s32>s32)?")
_LOW_BIT = re.compile(r"lb(?P<bits>\d+)(?:o(?P<outliers>\d+))?(?P<rotate>r)?")
_GRAMMAR_HINT = "write [smN[a[K]]+]FORMAT, e.g. fp16, int8, sm4, sm4a, sm4+int8"


_REGISTERED: dict[str, Callable[[], Codec]] = {}


def register_codec(name: str, factory: Callable[[], Codec]) -> None:
    """Make `get_codec(name)` return `factory()` (the codec's `.name` must be `name`, lower case)."""
    key = name.strip().lower()
    codec = factory()
    if codec.name != key:
        raise ValueError(f"codec factory for {name!r} makes a codec named {codec.name!r}; the names must agree")
    if not isinstance(codec, Codec):
        raise ValueError(f"{codec!r} lacks part of the Codec protocol (compress/base.py): wire_spec, encode, "
                         f"decode, nbytes, ratio, extra_vectors, num_vectors")
    _REGISTERED[key] = factory


def list_codecs() -> list[str]:
    """Names of the standard codec family (what profiling measures unless told otherwise)."""
    return list(_STANDARD)


LOSSLESS_CODECS: tuple[str, ...] = ("fp32", "fp16", "bf16")
"""Float wire formats whose fidelity loss counts as 0 without a measurement (issue 16): fp32 is exact; fp16
and bf16 only round each value to the wire dtype (relative error <= 2^-11 / 2^-8), far below any metric the
profile measures. A measured loss, where the profile has one, is used instead."""


def wire_format_name(name: str) -> str:
    """Codec `name` normalised, with a kv share's wrapper taken off (kv50:fp16 -> fp16: the same wire dtype for
    the vectors and for the keys and values)."""
    text = name.strip().lower()
    kv_share = KV_SHARE_NAME.fullmatch(text)
    return kv_share["inner"] if kv_share else text


def is_lossless(name: str) -> bool:
    """True when codec `name` is one of `LOSSLESS_CODECS` (see there), or sends a share of the tokens as keys and
    values in one of them (kv50:fp16: the same attention in the same wire dtype)."""
    return wire_format_name(name) in LOSSLESS_CODECS


def list_formats() -> list[str]:
    return ["fp32", "fp16", "bf16", "int8", "int8c", "int4"]


def _parse_positive_int(text: str, what: str, name: str) -> int:
    if not re.fullmatch(r"\d+", text):
        raise ValueError(f"codec {name!r}: {what} {text!r} is not a whole number >= 1; {_GRAMMAR_HINT}")
    value = int(text)
    if value < 1:
        raise ValueError(f"codec {name!r}: {what} {value} must be >= 1; {_GRAMMAR_HINT}")
    return value


def _parse_sm(part: str, name: str) -> tuple[int, int] | None:
    """"sm4a2" -> (ratio 4, anchors 2); None when `part` is not a Segment Means term."""
    match = _SM.fullmatch(part)
    if match is None:
        return None
    if match["ratio"] == "":
        raise ValueError(f"codec {name!r}: Segment Means needs a ratio, e.g. sm4")
    ratio = _parse_positive_int(match["ratio"], "Segment Means ratio", name)
    if match["anchor"] is None:
        return ratio, 0
    if match["slots"] == "":
        return ratio, DEFAULT_MAX_ANCHORS
    return ratio, _parse_positive_int(match["slots"], "anchor slot count", name)


def _parse_format(part: str, name: str) -> ValueFormat | None:
    floats = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if part in floats:
        return FloatFormat(floats[part])
    low_bit = _LOW_BIT.fullmatch(part)
    if low_bit is not None:
        bits = int(low_bit["bits"])
        if not 2 <= bits <= 8:
            raise ValueError(f"codec {name!r}: low-bit width {bits} must be in 2..8, e.g. lb3o4r")
        return LowBitFormat(bits, int(low_bit["outliers"] or 0), bool(low_bit["rotate"]))
    match = _INT_FORMAT.fullmatch(part)
    if match is None:
        return None
    scale_dtype = torch.float32 if match["s32"] else torch.float16
    if match["group"] is not None:
        if match["kind"] != "int4":
            raise ValueError(f"codec {name!r}: only int4 takes a group size (int4g64); {match['kind']} has none")
        return Int4GroupFormat(_parse_positive_int(match["group"], "int4 group size", name), scale_dtype)
    if match["kind"] == "int4":
        return Int4GroupFormat(32, scale_dtype)
    if match["kind"] == "int8c":
        return Int8ChannelFormat(scale_dtype)
    return Int8TokenFormat(scale_dtype)


def get_codec(name: str) -> Codec:
    """Parse a codec name (see the module grammar). Raises ValueError naming the problem and the fix."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"codec name {name!r} is empty; {_GRAMMAR_HINT}")
    text = name.strip().lower()
    if text in _REGISTERED:
        return _REGISTERED[text]()
    if text.startswith(NAME_PREFIX):  # calibrated on data: its state file, loaded once, then registered
        codec = load_calibrated(text)
        register_codec(codec.name, lambda: codec)
        return codec
    if text.startswith("delta:"):
        return _parse_delta(text, name)
    kv_share = KV_SHARE_NAME.fullmatch(text)
    if kv_share:
        return KVShareCodec(get_codec(kv_share["inner"]), int(kv_share["percent"]))
    parts = text.split("+")
    if len(parts) > 2:
        raise ValueError(f"codec {name!r} has {len(parts)} stages; at most two: Segment Means then one format, "
                         f"e.g. sm4+int8")
    if any(not p for p in parts):
        raise ValueError(f"codec {name!r} has an empty stage around '+'; {_GRAMMAR_HINT}")
    kinds = [("sm", _parse_sm(p, name)) if p.startswith("sm") else ("format", _parse_format(p, name)) for p in parts]
    for part, (_kind, parsed) in zip(parts, kinds):
        if parsed is None:
            raise ValueError(f"unknown codec stage {part!r} in {name!r}; formats: {', '.join(list_formats())}; "
                             f"Segment Means: smN or smNa[K]; {_GRAMMAR_HINT}")

    if len(kinds) == 1:
        kind, parsed = kinds[0]
        if kind == "sm":
            assert isinstance(parsed, tuple), parsed
            ratio, slots = parsed
            return SegmentMeansCodec(ratio=ratio, max_anchors=slots)
        if isinstance(parsed, FloatFormat):
            return IdentityCodec(parsed.dtype)
        if isinstance(parsed, LowBitFormat):
            return PackedMaskCodec(parsed)
        assert isinstance(parsed, ValueFormat), parsed
        return QuantizedCodec(parsed)

    (first_kind, first), (second_kind, second) = kinds
    if first_kind == "format" and second_kind == "sm":
        raise ValueError(f"codec {name!r}: Segment Means must come first (it averages, then the format "
                         f"quantises the means); write {parts[1]}+{parts[0]!s}")
    if first_kind == "format":
        raise ValueError(f"codec {name!r} chains two formats ({parts[0]}, {parts[1]}); choose one, "
                         f"optionally after Segment Means, e.g. sm4+{parts[1]}")
    if second_kind == "sm":
        assert isinstance(first, tuple) and isinstance(second, tuple), (first, second)
        raise ValueError(f"codec {name!r} has two Segment Means stages; use one with the product ratio, "
                         f"e.g. sm{first[0] * second[0]}")
    assert isinstance(first, tuple) and isinstance(second, ValueFormat), (first, second)
    ratio, slots = first
    return SegmentMeansCodec(ratio=ratio, max_anchors=slots, values=second)


def _parse_delta(text: str, name: str) -> DeltaCodec:
    """"delta:lb8o4:lb3o4r" -> DeltaCodec(key frame lb8o4, residuals lb3o4r); "delta:int8" uses one format;
    "delta:lb4o4r:lb3o4r*4:lb4o4r": layers 1-4 in lb3o4r, layer 5 and later in lb4o4r."""
    stages = text.split(":")[1:]
    hint = "write delta:FORMAT, delta:FIRST:REST or delta:FIRST:MIDDLE[*N]:...:REST, e.g. delta:lb4o4r:lb3o4r*4:lb4o4r"
    if not stages or any(not s for s in stages):
        raise ValueError(f"codec {name!r}: {hint}")
    formats: list[ValueFormat] = []
    for position, stage in enumerate(stages):
        part, star, count_text = stage.partition("*")
        count = 1
        if star:
            if position in (0, len(stages) - 1):
                raise ValueError(f"codec {name!r}: only a middle format takes *N (the key frame is one layer, the "
                                 f"last format repeats for every later layer); {hint}")
            count = _parse_positive_int(count_text, "layer count", name)
        fmt = _parse_format(part, name)
        if fmt is None:
            raise ValueError(f"codec {name!r}: unknown format {part!r} in a delta codec; formats: "
                             f"{', '.join(list_formats())}, lbB[oK][r]; e.g. delta:lb8o4:lb3o4r")
        formats += [fmt] * count
    return DeltaCodec(formats[0], formats[-1], tuple(formats[1:-1]))


def parse_codec_list(text: str) -> list[Codec]:
    """"fp16,int8,sm4" -> codecs in that order. Duplicates (same canonical name) are an error."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"codec list {text!r} is empty; give comma-separated names, e.g. fp16,int8,sm4")
    codecs: list[Codec] = []
    seen: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            raise ValueError(f"codec list {text!r} has an empty entry; remove the extra comma")
        codec = get_codec(item)
        if codec.name in seen:
            raise ValueError(f"codec list {text!r} names {codec.name} twice ({seen[codec.name]!r} and "
                             f"{item.strip()!r}); list each once")
        seen[codec.name] = item.strip()
        codecs.append(codec)
    return codecs


def _settings(value: object) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # compare=False fields are caches, not settings (e.g. LowBitFormat's rotation matrix)
        inner = ",".join(f"{f.name}={_settings(getattr(value, f.name))}" for f in dataclasses.fields(value)
                         if f.compare)
        return f"{type(value).__name__}({inner})"
    return repr(value)


def codec_fingerprint(codec: Codec) -> str:
    """Stable string of every setting of a codec (class names, fields, dtypes) plus the wire version.

    Ranks compare fingerprints at start-up; equal fingerprints mean equal wire layouts.
    e.g. "edgeprism-codec/1:SegmentMeansCodec(ratio=4,max_anchors=2,values=Int8TokenFormat(scale_dtype=float16))".
    """
    return f"edgeprism-codec/{FINGERPRINT_VERSION}:{_settings(codec)}"


def traffic_ratio(codec: Codec, batch: int, num_tokens: int, hidden_size: int, num_layers: int = 1) -> float:
    """Bytes of `codec`'s messages / bytes of the fp32 identity messages (same shapes) over `num_layers`
    exchanges; 1/x is the compression ratio. Give the model's `num_layers` for stateful codecs (delta):
    with the default 1 they are charged their key frame alone."""
    fp32_nbytes = IdentityCodec(torch.float32).nbytes(batch, num_tokens, hidden_size)
    return mean_nbytes(codec, num_layers, batch, num_tokens, hidden_size) / fp32_nbytes


def request_nbytes(codec: Codec, num_layers: int, batch: int, num_tokens: int, hidden_size: int) -> int:
    """Bytes one rank's messages take over a request's `num_layers` exchanges (one per block), exact.

    A stateful codec whose message changes by layer (`layer_nbytes`: delta coding sends a key frame at
    layer 0, then smaller residuals) is summed layer by layer; any other codec is `num_layers × nbytes`.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers {num_layers!r} must be an integer >= 1 (the model's block count)")
    layer_nbytes = getattr(codec, "layer_nbytes", None)
    if layer_nbytes is None:
        return num_layers * codec.nbytes(batch, num_tokens, hidden_size)
    return sum(int(layer_nbytes(layer, batch, num_tokens, hidden_size)) for layer in range(num_layers))


def mean_nbytes(codec: Codec, num_layers: int, batch: int, num_tokens: int, hidden_size: int) -> float:
    """Bytes of one rank's message per exchange, averaged over a model of `num_layers` blocks
    (`request_nbytes / num_layers`; equal to `nbytes` for codecs whose message is the same every layer)."""
    return request_nbytes(codec, num_layers, batch, num_tokens, hidden_size) / num_layers


def num_vectors(codec: Codec, num_tokens: int) -> int:
    """Vectors a receiver attends to (K/V rows it computes) for a sender holding `num_tokens` tokens."""
    return int(codec.num_vectors(num_tokens))
