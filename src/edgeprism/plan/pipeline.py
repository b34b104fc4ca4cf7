"""What overlapping each layer's exchange with compute hides, per layer: pure arithmetic for the cost model.

The runtime can hide a layer's exchange two ways (partition/overlap.py, partition/microbatch.py):

- **Own-key attention** (`overlap`): a rank starts the all-gather, then projects its own tokens' keys/values and
  attends over them while the bytes travel; only the received vectors' part waits for them. The work that can
  run beside the exchange is the layer's own-key work, `own_key_s`: the own tokens' K/V projections and
  their attention over each other (per_kv_s and per_token_kv_s in the cost model's layer formula, at kv =
  n_own) plus their Q projection — a third GEMM of the same size as K's or V's, so half of what per_kv_s
  prices per token (the profile does not time Q apart: it sits in per_token_s with the MLP). A kv-share codec
  (compress/kvshare.py) sends some own keys and values, so the rank projects its K/V before the send: only the
  Q projection and the own attention remain beside the exchange.
- **Micro-batches** (`micro_batches` = m >= 2): the batch runs as m slices in turn, layer by layer, so one
  slice's exchange travels while the others compute. Each slice pays the per-call fixed cost again and its
  own link hops; its bytes are 1/m of the batch's.

With per layer C the rank's compute of the whole batch (with the m - 1 extra fixed costs), own_s its own-key
part (0 without overlap) and x = network/m + hops · link latency one slice's exchange, a slice's cycle is its
non-overlappable compute, then whichever is longer of its exchange and the work that runs meanwhile (its own
own-key part and the other m - 1 slices' compute); the link carries the m exchanges one after another:

    layer_s = max(C,  (C - own_s) / m + x,  m · x)

m = 1 without overlap gives C + x (the exchange after the compute: the sequential model); m = 1 with overlap
gives C + x - min(own_s, x). Checked against per-layer timelines in docs/METHODOLOGY.md ("cost model").
"""

from __future__ import annotations

from collections.abc import Sequence


def pipelined_layer_s(compute_s: float, own_s: float, exchange_s: float, micro_batches: int) -> float:
    """One layer's critical-path seconds on one rank (see the module docstring): `compute_s` the layer's compute
    of the whole batch, `own_s` (<= compute_s) the part over own keys that may run beside the exchange (0: no
    overlap), `exchange_s` one micro-batch's exchange (its wire seconds plus its hops' latency)."""
    m = micro_batches
    return max(compute_s, (compute_s - own_s) / m + exchange_s, m * exchange_s)


def own_key_s(per_kv_s: float, per_token_kv_s: float, batch: int, num_own: int, kv_share: bool = False) -> float:
    """A layer's own-key work at speed 1 (see the module docstring): K/V projections and the attention of the
    own tokens over each other, and their Q projection, half of what the K/V projections cost. `kv_share`: a
    kv-share codec sends some own keys and values (compress/kvshare.py), so the rank projects them all before
    its send: only the Q projection and the attention run beside the exchange."""
    return batch * num_own * ((0.5 if kv_share else 1.5) * per_kv_s + per_token_kv_s * num_own)


def pipelined_layers(base: Sequence[float], slope: Sequence[float], fixed: Sequence[float], own: Sequence[float],
                     counts: Sequence[int], received: Sequence[int], micro_batches: int, network_s: float,
                     hops_latency_s: float, codec_s: Sequence[float] = ()) -> tuple[float, float, float]:
    """One layer of an encoder plan, per rank p layer seconds = base_p + slope_p · kv_p (plan/cost.py; kv_p =
    counts[p] + received[p], the vectors per row it reads from the others: `received_vectors`) plus
    (m - 1) · fixed_p plus `codec_s[p]` (the codec's own encode/decode, compute like the rest, less the K/V
    projections a kv share spares the receiver: `plan.vectors.codec_layer_s`; empty: none);
    `own` per rank the own-key seconds that may run beside the exchange (empty: no overlap),
    `network_s` the layer's wire seconds for the whole batch,
    `hops_latency_s` one exchange's hops × link latency -> (the slowest rank's layer compute, the ranks' summed
    layer compute, the seconds per layer hidden against the sequential model C + network + m · hops latency)."""
    m = micro_batches
    exchange_s = network_s / m + hops_latency_s  # one micro-batch's
    max_layer_s = sum_layer_s = critical_s = 0.0
    for p, n in enumerate(counts):
        layer_s = base[p] + slope[p] * (n + received[p]) + (m - 1) * fixed[p]
        if codec_s:
            layer_s += codec_s[p]
        own_s = min(own[p], layer_s) if own else 0.0
        critical_s = max(critical_s, pipelined_layer_s(layer_s, own_s, exchange_s, m))
        max_layer_s = max(max_layer_s, layer_s)
        sum_layer_s += layer_s
    sequential_s = max_layer_s + network_s + m * hops_latency_s
    return max_layer_s, sum_layer_s, max(0.0, sequential_s - critical_s)


__all__ = ["own_key_s", "pipelined_layer_s", "pipelined_layers"]
