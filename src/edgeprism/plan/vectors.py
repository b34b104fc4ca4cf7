"""What each rank of a plan reads per layer and what its codec adds to the layer's compute: pure arithmetic for
the cost model (plan/cost.py, whose docstring has the formulas: S_q, K_q, W_q, spared_p, codec_p)."""

from __future__ import annotations

from collections.abc import Sequence

from edgeprism.profile.schema import CodecFidelity


def received_vectors(segments: Sequence[int], causal: bool) -> list[int]:
    """Per rank p, the K/V vectors per row it reads from the others' messages of `segments[q]` vectors each:
    decoders from ranks q < p only (the partition-aware causal mask), encoders from every other rank. A rank's
    layer attends over its own tokens plus these: kv_p = n_p + received_p."""
    total = sum(segments)
    received, seen = [], 0
    for sent in segments:
        received.append(seen if causal else total - sent)
        seen += sent
    return received


def codec_received_s(codec: CodecFidelity, kv_s: float, slope: Sequence[float], counts: Sequence[int],
                     speeds: Sequence[float], causal: bool) -> list[float]:
    """Per rank, one layer's seconds for the vectors it reads with `codec` (`GroupTerms.slope` each), less the
    K/V projections (`kv_s` = per_kv_s · B each, at the rank's speed) of the received tokens that arrive as keys
    and values (a kv share, `CodecFidelity.kv_tokens`)."""
    received = received_vectors([codec.num_vectors(n) for n in counts], causal)
    if not codec.kv_share:
        return [s * r for s, r in zip(slope, received)]
    spared = received_vectors([codec.kv_tokens(n) for n in counts], causal)
    return [s * r - kv_s * t / speed for s, r, t, speed in zip(slope, received, spared, speeds)]


def codec_layer_s(codec: CodecFidelity, per_kv_s: float, batch: int, counts: Sequence[int],
                  segments: Sequence[int], received: Sequence[int], speeds: Sequence[float],
                  causal: bool) -> list[float]:
    """Per rank, what `codec` adds to one layer's compute besides the vectors it reads: its encode and decode
    per wire vector (`codec_compute_s` over `CodecFidelity.wire_vectors`), less the K/V projections of the
    received tokens that a kv share sends as keys and values (per_kv_s · B each). Empty when both are 0."""
    if not codec.kv_share:
        if not (codec.encode_s_per_vector or codec.decode_s_per_vector):
            return []
        return codec_compute_s(codec, batch, segments, received, speeds)
    kv_sent = [codec.kv_tokens(n) for n in counts]
    wire = [s + t for s, t in zip(segments, kv_sent)]
    coded = codec_compute_s(codec, batch, wire, received_vectors(wire, causal), speeds)
    spared = received_vectors(kv_sent, causal)
    return [x - per_kv_s * batch * t / speed for x, t, speed in zip(coded, spared, speeds)]


def codec_compute_s(codec: CodecFidelity, batch: int, segments: Sequence[int], received: Sequence[int],
                    speeds: Sequence[float]) -> list[float]:
    """Per rank, one layer's seconds of the codec's own compute: encoding its message of `segments[p]` vectors
    per row and decoding the `received[p]` it reads (`received_vectors`), at the rank's speed. All zeros for a
    profile entry without measured encode/decode seconds."""
    enc_s, dec_s = batch * codec.encode_s_per_vector, batch * codec.decode_s_per_vector
    return [(enc_s * sent + dec_s * num_received) / speed
            for sent, num_received, speed in zip(segments, received, speeds)]


def padded_received_bytes(codec: CodecFidelity, batch: int, widest: float, ranks: int,
                          seal_bytes: float = 0.0) -> float:
    """Bytes each of `ranks` ranks receives in one layer's all-gather: every other message padded to the widest
    (GLOO's all-gather takes equal shapes), `widest` in `CodecFidelity.wire_tokens` units; `seal_bytes` per message
    where the lanes are sealed."""
    return (ranks - 1) * (batch * codec.wire_bytes_per_row + seal_bytes + batch * codec.wire_bytes_per_token * widest)


__all__ = ["codec_compute_s", "codec_layer_s", "codec_received_s", "padded_received_bytes", "received_vectors"]
