"""The position-wise exchange in one process, differentiable: what `PositionWise` computes, for training.

`emulate(model, inputs, codec, world_size)` splits the tokens into the same ranges as the distributed
transform (`partition.ranges.split_tokens`), embeds each range with its absolute positions, and per
block lets each range's queries attend to its own keys/values plus the decoded codec messages of the
other ranges (decoders: only earlier ranges), through the very function the transform calls per
layer (`partition.transform.block_with_remote`). No threads, no bytes on a wire: the codec's
`encode` → `decode` round trip stands for the exchange (packing to bytes and back is exact).

Gradients. `codec_roundtrip` uses a straight-through estimator: the forward value is exactly what the
codec's decode gives (computed without autograd), the gradient is that of a float surrogate — the same
Segment Means with fp32 values (a masked mean, differentiable; for float Segment Means surrogate and
decoded value are equal, so its gradient is exact), or the identity for codecs that send every token
(int8, low-bit, delta). Quantisers' rounding has no useful gradient, and some wire formats would keep
a misleading partial one (through their scale), hence no autograd through `encode`. Counts carry none.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor

from edgeprism.compress.base import Codec
from edgeprism.compress.codecs import SegmentMeansCodec
from edgeprism.compress.formats import FloatFormat
from edgeprism.models.base import Inputs, ReferenceModel
from edgeprism.partition.attend import block_with_remote, exchanged_states, own_key_bias
from edgeprism.partition.ranges import equal_shares, split_tokens
from edgeprism.partition.transform import DEFAULT_AVERAGE, DEFAULT_SIZE_AWARE

Outputs = dict[str, Tensor]


def _surrogate(codec: Codec, hidden: Tensor, valid: Tensor, anchor: Tensor | None) -> Tensor:
    """A differentiable stand-in with the decoded vectors' shape: float Segment Means, else the tokens."""
    if isinstance(codec, SegmentMeansCodec):
        float_codec = dataclasses.replace(codec, values=FloatFormat())
        return float_codec.decode(float_codec.encode(hidden, valid, anchor))[0]
    return hidden.to(torch.float32) * valid.unsqueeze(-1)  # every token travels; padding is masked anyway


def straight_through(decoded: Tensor, surrogate: Tensor) -> Tensor:
    """Forward: `decoded`; backward: the gradient of `surrogate` (straight-through estimator)."""
    return surrogate + (decoded - surrogate).detach()


def codec_roundtrip(codec: Codec, hidden: Tensor, valid: Tensor, anchor: Tensor | None,
                    session=None, layer: int = 0, sender: int = 0) -> tuple[Tensor, Tensor]:
    """hidden (B, n, d) → what a receiver decodes: vectors (B, S, d) in hidden's dtype, counts (B, S).

    `session`: a stateful codec's per-sender session (driven layer by layer, as each rank drives its own)."""
    with torch.no_grad():  # what the wire carries; some formats keep a partial graph (e.g. through a scale)
        if session is not None:
            vectors, counts = session.decode(layer, sender, session.encode(layer, hidden, valid, anchor))
        else:
            vectors, counts = codec.decode(codec.encode(hidden, valid, anchor))
    if hidden.requires_grad:  # float Segment Means: surrogate == decoded, so this is its exact gradient
        vectors = straight_through(vectors, _surrogate(codec, hidden, valid, anchor))
    return vectors.to(hidden.dtype), counts


def emulate(model: ReferenceModel, inputs: Inputs, codec: Codec, world_size: int,
            shares: tuple[float, ...] | None = None, size_aware: bool = DEFAULT_SIZE_AWARE,
            average: Literal["residual", "normed"] = DEFAULT_AVERAGE) -> Outputs:
    """The outputs `PositionWise.forward(..., gather_hidden=True)` returns on rank 0, computed in one
    process with autograd: {"hidden": (B, T, d) after the final norm, the head's rows, "mean" (encoders)}."""
    if world_size < 1:
        raise ValueError(f"world size {world_size} must be >= 1")
    num_tokens = model.validate_input(inputs)
    ranges = split_tokens(num_tokens, shares or equal_shares(world_size))
    if len(ranges) != world_size:
        raise ValueError(f"{len(ranges)} shares for a world of {world_size} ranks; give one per rank")
    causal = model.causal
    parts = [model.split_input(inputs, r.start, r.end) for r in ranges]
    hidden = [model.embed(part, r.start, r.end) for part, r in zip(parts, ranges)]  # each (B, n_p, d)
    batch = hidden[0].shape[0]
    device, dtype = hidden[0].device, hidden[0].dtype
    valid = [model.valid_mask(part, batch, r.num_tokens).to(device) for part, r in zip(parts, ranges)]
    anchor = [model.anchor_mask(part, r.start, r.end).to(device) for part, r in zip(parts, ranges)]
    own_bias = [own_key_bias(v, r.start, r.end, causal, dtype) for v, r in zip(valid, ranges)]
    positions = [torch.arange(r.start, r.end, device=device) for r in ranges]  # global token indices
    # one session per sender: it holds that sender's reconstruction as every receiver holds it
    sessions = [codec.session() if hasattr(codec, "session") else None for _ in ranges]
    # decoders send only forward (docs/ARCHITECTURE.md rule 5): the last rank's message has no reader
    senders = range(world_size - 1) if causal else range(world_size)
    for layer, block in enumerate(model.blocks):
        sent = [exchanged_states(block, h, average, pos) for h, pos in zip(hidden, positions)]
        received = {q: codec_roundtrip(codec, sent[q], valid[q], anchor[q], sessions[q], layer, q) for q in senders}
        new_hidden = []
        for p in range(world_size):
            readable = [q for q in senders if q != p and (q < p or not causal)]
            if readable:
                remote = torch.cat([received[q][0] for q in readable], dim=1)  # (B, S_remote, d)
                counts = torch.cat([received[q][1] for q in readable], dim=1)  # (B, S_remote)
            else:  # rank 0 of a decoder reads nobody
                remote, counts = sent[p].new_zeros(batch, 0, sent[p].shape[-1]), hidden[p].new_zeros(batch, 0)
            out, _, _ = block_with_remote(block, hidden[p], own_bias[p], remote, counts, size_aware, average, sent[p],
                                          positions[p])
            new_hidden.append(out)
        hidden = new_hidden
    full = model.finish(torch.cat(hidden, dim=1))  # (B, T, d)
    outputs: Outputs = {"hidden": full}
    outputs.update(model.head(full[:, -1] if causal else full[:, 0]))
    if not causal:
        weights = torch.cat(valid, dim=1).to(full.dtype)[..., None]  # (B, T, 1)
        outputs["mean"] = (full * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return outputs
