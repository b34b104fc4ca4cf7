"""Reading what the ranks exchanged: each other rank's message decoded, and for a kv-share codec
(compress/kvshare.py) split into the inputs to project and the keys and values that arrived as such; with the rule
for where a kv share can run at all (`kv_share_refusal`: asked by the transform, the planner and the profiler)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from edgeprism.compress.base import WireSpec, unpack
from edgeprism.compress.kvshare import KVShareCodec, kv_split
from edgeprism.models.config import ModelConfig
from edgeprism.partition.ranges import TokenRange


def kv_share_refusal(config: ModelConfig, overlap: bool = True, average: str = "normed") -> str | None:
    """Why a kv-share codec (compress/kvshare.py) cannot run on this model and path, or None if it can: an encoder
    whose blocks split their attention, on the overlapped path, averaging the normalised input, with keys and values
    as wide as its hidden states. The planner (plan/constants.py) and the profiler ask it too, of the transform's
    default `average` (`partition.transform.DEFAULT_AVERAGE`; tests/test_kvshare.py pins the two equal)."""
    if config.causal or config.exchanges_kv:
        return "its blocks do not split their attention (a decoder: they exchange keys and values already)"
    if not overlap:
        return "the exchange is not overlapped (overlap off, or its blocks do not split their attention)"
    if average != "normed":
        return "it averages the residual stream (average='residual')"
    if config.kv_heads * config.head_dim != config.hidden_size:
        return "its keys and values are narrower than its hidden states"
    return None


def decoded_messages(received: Sequence[Tensor | None], specs: Sequence[WireSpec], rank: int,
                     decode: Callable[[int, list[Tensor]], tuple[Tensor, Tensor]]
                     ) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(sender q, vectors, counts) of every message `rank` may read (not its own, not None), in rank order;
    `decode(q, wire)` decodes sender q's unpacked wire."""
    for q, buffer in enumerate(received):
        if q == rank or buffer is None:
            continue
        yield (q, *decode(q, unpack(buffer, specs[q])))


def read_kv_messages(codec: KVShareCodec, received: Sequence[Tensor | None], specs: Sequence[WireSpec], rank: int,
                     ranges: Sequence[TokenRange], dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The others' messages of a kv-share codec -> (K/V inputs (B, S_in, d), their counts (B, S_in), keys and
    values in the heads-merged layout (B, S_kv, d) each, their counts (B, S_kv)), senders in rank order."""
    parts: list[list[Tensor]] = [[], [], [], [], []]
    for q, rows, counts in decoded_messages(received, specs, rank, lambda _q, wire: codec.decode(wire)):
        for bucket, piece in zip(parts, kv_split(codec, rows.to(dtype), counts, ranges[q].num_tokens)):
            bucket.append(piece)
    inputs, in_counts, keys, values, kv_counts = (torch.cat(bucket, dim=1) for bucket in parts)
    return inputs, in_counts, keys, values, kv_counts


__all__ = ["decoded_messages", "kv_share_refusal", "read_kv_messages"]
