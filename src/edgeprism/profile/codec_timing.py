"""What a codec's own compute costs: encode and decode seconds per vector, for the profile's codec section.

A codec's encode (on the sender) and decode (on each receiver) run on the rank's CPU every layer, beside the
block's compute; the cost model charges them at the rank's speed (plan/cost.py). The seconds come from here:
the codec encodes and decodes random vectors of the model's exchange width (`ModelConfig.exchange_width`:
hidden states, or a decoder's keys and values) on **one thread of the profiling process**, which stands for
the reference device (speed 1.0), like the compute table. Stateful codecs (delta coding, calibrated per-layer
transforms: those with `session()`) are driven through a session over the model's layers, as the transform
drives them, so the figure is the mean over layers (a key frame at layer 0, residuals after).

Per vector means per vector sent (encode: the `num_vectors(n)` a message carries for n tokens) and per vector
received (decode); for codecs that send every token both are per token. A kv share (kv50:int8) is timed on a
message of random vectors, as its inner format encodes the keys-and-values message: its figures are per vector on
the wire (`CodecFidelity.wire_vectors`: a key and a value per token sent as such), as the cost model charges them.
Each figure is the median of
`repeats` timed passes after `warmup` untimed ones; a pass covers about `target_vectors` vectors, so the whole
measurement stays near a second per codec even for the slowest codecs here (~40 µs per vector).

`refresh_codec_timings(profile)` re-measures only these fields of an existing profile (compute, link, energy
and fidelity kept as measured), for profiles written before the fields existed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from edgeprism.compress.base import Codec
from edgeprism.compress.registry import get_codec
from edgeprism.profile.schema import CodecFidelity, Profile

log = logging.getLogger(__name__)

DEFAULT_TOKENS_PER_MESSAGE = 512
"""Tokens per encoded message while timing: a rank's share of a few hundred to a thousand tokens (the per-vector
cost grows once a pass outgrows the caches: lb6o4r at 384 features, encode + decode ~40-50 us a vector at 1,024
vectors a pass, ~85 at 4,096, on a loaded 2-core host)."""
DEFAULT_TARGET_VECTORS = 2048
"""Vectors a timed pass covers (rows of `DEFAULT_TOKENS_PER_MESSAGE` tokens, or layers of a session)."""


_NOTE = "codec encode/decode seconds per vector measured"


@dataclasses.dataclass(frozen=True)
class CodecTiming:
    """One codec's measured compute at speed 1.0: seconds per vector sent (encode) and received (decode)."""

    codec: str
    encode_s_per_vector: float
    decode_s_per_vector: float
    vectors_per_pass: int

    def __str__(self) -> str:
        return (f"{self.codec}: encode {self.encode_s_per_vector * 1e6:.2f} us + decode "
                f"{self.decode_s_per_vector * 1e6:.2f} us per vector")


def measure_codec_timing(codec: Codec, width: int, num_layers: int = 1,
                         num_tokens: int = DEFAULT_TOKENS_PER_MESSAGE, target_vectors: int = DEFAULT_TARGET_VECTORS,
                         warmup: int = 1, repeats: int = 5, seed: int = 0) -> CodecTiming:
    """Time `codec` on one thread at `width` features per vector (see the module docstring); `num_layers`: the
    model's exchanges, over which a stateful codec's session is driven."""
    if width < 1 or num_layers < 1 or num_tokens < 1 or target_vectors < 1:
        raise ValueError(f"codec timing needs width {width}, num_layers {num_layers}, num_tokens {num_tokens} "
                         f"and target_vectors {target_vectors} all >= 1")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"codec timing: warmup {warmup} must be >= 0 and repeats {repeats} >= 1")
    stateful = hasattr(codec, "session")
    layers = num_layers if stateful else 1
    if stateful:  # one row per layer, fewer tokens when the layers alone reach the target
        batch, n = 1, min(num_tokens, max(8, math.ceil(target_vectors / layers)))
    else:
        n = num_tokens
        batch = max(1, math.ceil(target_vectors / n))
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, n, width, generator=gen)  # (B, n, width)
    valid = torch.ones(batch, n, dtype=torch.bool)
    anchor = torch.zeros(batch, n, dtype=torch.bool)
    anchor[:, 0] = True
    sent = batch * codec.num_vectors(n) * layers
    encode_s: list[float] = []
    decode_s: list[float] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for i in range(warmup + repeats):
                enc, dec = _one_pass(codec, hidden, valid, anchor, layers, stateful)
                if i >= warmup:
                    encode_s.append(enc)
                    decode_s.append(dec)
    finally:
        torch.set_num_threads(threads)
    return CodecTiming(codec.name, statistics.median(encode_s) / sent, statistics.median(decode_s) / sent, sent)


def _one_pass(codec: Any, hidden: torch.Tensor, valid: torch.Tensor, anchor: torch.Tensor, layers: int,
              stateful: bool) -> tuple[float, float]:
    """-> (encode seconds, decode seconds) of one pass: every layer's message encoded, then read back as a
    receiver does (a session decodes it as sender 1's)."""
    session = codec.session() if stateful else None
    encode_s = decode_s = 0.0
    for layer in range(layers):
        start = time.perf_counter()
        wire = session.encode(layer, hidden, valid, anchor) if session is not None else codec.encode(hidden, valid,
                                                                                                     anchor)
        mid = time.perf_counter()
        if session is not None:
            session.decode(layer, 1, wire)
        else:
            codec.decode(wire)
        encode_s += mid - start
        decode_s += time.perf_counter() - mid
    return encode_s, decode_s


def with_timing(entry: CodecFidelity, timing: CodecTiming) -> CodecFidelity:
    """`entry` with the measured encode/decode seconds (everything else as it was)."""
    return dataclasses.replace(entry, encode_s_per_vector=timing.encode_s_per_vector,
                               decode_s_per_vector=timing.decode_s_per_vector)


def timed_entries(entries: Sequence[CodecFidelity], codecs: Sequence[Codec], width: int, num_layers: int,
                  **options: Any) -> tuple[CodecFidelity, ...]:
    """Each entry with its codec's encode/decode seconds measured (`codecs` in the entries' order)."""
    out = []
    for entry, codec in zip(entries, codecs, strict=True):
        timing = measure_codec_timing(codec, width, num_layers, **options)
        log.info("codec timing %s", timing)
        out.append(with_timing(entry, timing))
    return tuple(out)


def refresh_codec_timings(profile: Profile, codec_names: Sequence[str] | None = None,
                          **options: Any) -> Profile:
    """`profile` with its codecs' encode/decode seconds re-measured here (all codecs, or those named; the
    rest of the profile as it was, a line in its notes says so). Cheap: about a second per codec."""
    names = set(codec_names) if codec_names is not None else {e.codec for e in profile.codecs}
    unknown = names - {e.codec for e in profile.codecs}
    if unknown:
        raise ValueError(f"codecs {sorted(unknown)} are not in the profile; profiled: "
                         f"{', '.join(e.codec for e in profile.codecs)}")
    chosen = [e for e in profile.codecs if e.codec in names]
    timed = {e.codec: e for e in timed_entries(chosen, [get_codec(e.codec) for e in chosen],
                                               profile.model.exchange_width, profile.model.num_layers, **options)}
    entries = [timed.get(e.codec, e) for e in profile.codecs]
    note = (f"{_NOTE} {time.strftime('%Y-%m-%d', time.gmtime())} on one thread of the profiling process "
            f"(profile/codec_timing.py), the rest as before")
    kept = [part for part in profile.notes.split("; ") if part and not part.startswith(_NOTE)]  # an earlier refresh's
    notes = "; ".join([*kept, note])
    return dataclasses.replace(profile, codecs=tuple(entries), notes=notes)


__all__ = ["CodecTiming", "measure_codec_timing", "refresh_codec_timings", "timed_entries", "with_timing"]
