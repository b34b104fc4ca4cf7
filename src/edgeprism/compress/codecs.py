"""The codecs beyond identity: per-token quantisation, and Segment Means (optionally with exact anchors).

Both follow the contract of `edgeprism.compress.base`: wire shapes are a function of
(batch, num_tokens, hidden_size) only; `decode` returns vectors (B, S, d) float32 and counts (B, S)
float32, the number of real tokens each vector stands for (0 = masked out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from edgeprism.compress.base import EveryTokenCodec, ValueCodec, WireSpec, check_inputs
from edgeprism.compress.formats import FloatFormat, ValueFormat

DEFAULT_MAX_ANCHORS = 2
"""Anchor slots per row of `smNa`: [CLS] and the closing [SEP] of a single BERT sentence, or GPT-2's
first token (the attention sink), fit; a rank holds a slice, so it rarely owns more than two."""


def count_dtype(max_count: int) -> torch.dtype:
    """Smallest integer dtype holding counts 0..max_count (uint8 up to 255, then int16, then int32)."""
    if max_count <= 255:
        return torch.uint8
    if max_count <= torch.iinfo(torch.int16).max:
        return torch.int16
    return torch.int32


@dataclass(frozen=True)
class QuantizedCodec(EveryTokenCodec):
    """Every token travels, in a (usually quantised) value format; counts are the valid mask (uint8).

    Padding tokens are zeroed before quantising so that they cannot inflate a shared scale.
    """

    values: ValueFormat = field(default_factory=FloatFormat)

    def wire_spec(self, batch: int, num_tokens: int, hidden_size: int) -> WireSpec:
        return [*self.values.wire_spec(batch, num_tokens, hidden_size), ((batch, num_tokens), torch.uint8)]

    def encode(self, hidden: Tensor, valid: Tensor, anchor: Tensor | None = None) -> list[Tensor]:
        check_inputs(hidden, valid, anchor, self.name)
        x = hidden.to(torch.float32) * valid.unsqueeze(-1)  # (B, n, d), padding zeroed
        return [*self.values.encode(x), valid.to(torch.uint8).contiguous()]



@dataclass(frozen=True)
class SegmentMeansCodec(ValueCodec):
    """Segment Means with compression ratio `ratio` (docs/ARCHITECTURE.md rule 1), optionally with anchors.

    The n tokens split into S = ceil(n / ratio) consecutive segments (the last may be shorter); each
    sends the mean of its real tokens and their count k (0 = masked out, sent as a zero vector).

    Anchors (`max_anchors` > 0): the first `max_anchors` tokens of a row that are flagged in the
    `anchor` mask and valid travel exact (un-averaged; in the same value format as the means) with
    count 1, and are left out of their segment's mean and count. Unused slots carry a zero vector
    and count 0. Anchor tokens beyond `max_anchors` in a row fall back into their segment's mean.
    `anchor=None` means no anchors. Slot order: the anchors of a row in position order, then the
    segments. Decoded layout: vectors (B, max_anchors + S, d), counts likewise.

    Wire: [*values (B, A + S, d) in the value format, counts (B, A + S) in `count_dtype(ratio)`].
    The means are computed in float32 whatever the input dtype.
    """

    ratio: int
    max_anchors: int = 0
    values: ValueFormat = field(default_factory=FloatFormat)

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int) or self.ratio < 1:
            raise ValueError(f"Segment Means ratio {self.ratio!r} must be an integer >= 1 (e.g. sm4)")
        if isinstance(self.max_anchors, bool) or not isinstance(self.max_anchors, int) or self.max_anchors < 0:
            raise ValueError(f"max_anchors {self.max_anchors!r} must be an integer >= 0 (e.g. sm4a2)")

    @property
    def name(self) -> str:
        anchors = ""
        if self.max_anchors:
            anchors = "a" if self.max_anchors == DEFAULT_MAX_ANCHORS else f"a{self.max_anchors}"
        values = "" if self.values.name == "fp32" else f"+{self.values.name}"
        return f"sm{self.ratio}{anchors}{values}"

    @property
    def extra_vectors(self) -> int:
        return self.max_anchors

    def num_segments(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.ratio)

    def num_vectors(self, num_tokens: int) -> int:
        """Vectors a receiver attends to for a sender of `num_tokens` tokens (anchor slots included)."""
        return self.max_anchors + self.num_segments(num_tokens)

    def wire_spec(self, batch: int, num_tokens: int, hidden_size: int) -> WireSpec:
        slots = self.num_vectors(num_tokens)
        return [*self.values.wire_spec(batch, slots, hidden_size),
                ((batch, slots), count_dtype(self.ratio))]

    def encode(self, hidden: Tensor, valid: Tensor, anchor: Tensor | None = None) -> list[Tensor]:
        check_inputs(hidden, valid, anchor, self.name)
        batch, num_tokens, hidden_size = hidden.shape
        x = hidden.to(torch.float32)
        valid = valid.to(torch.bool)
        anchor_vectors, anchor_counts, taken = self._take_anchors(x, valid, anchor)
        weight = (valid & ~taken).to(torch.float32)  # (B, n): tokens that go into a mean

        num_segments = self.num_segments(num_tokens)
        pad = num_segments * self.ratio - num_tokens
        x_pad = torch.nn.functional.pad(x, (0, 0, 0, pad))  # (B, S·c, d)
        x_seg = x_pad.reshape(batch, num_segments, self.ratio, hidden_size)  # (B, S, c, d)
        w_seg = torch.nn.functional.pad(weight, (0, pad)).reshape(batch, num_segments, self.ratio, 1)  # (B, S, c, 1)
        counts = w_seg.sum(dim=(2, 3))  # (B, S)
        sums = (x_seg * w_seg).sum(dim=2)  # (B, S, d)
        means = sums / counts.clamp(min=1).unsqueeze(-1)  # (B, S, d); k = 0 -> zero vector

        vectors = torch.cat([anchor_vectors, means], dim=1)  # (B, A + S, d)
        all_counts = torch.cat([anchor_counts, counts], dim=1)  # (B, A + S)
        dtype = self.wire_spec(batch, num_tokens, hidden_size)[-1][1]
        return [*self.values.encode(vectors), all_counts.round().to(dtype).contiguous()]

    def _take_anchors(self, x: Tensor, valid: Tensor, anchor: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """-> anchor vectors (B, A, d), their counts (B, A) float32, mask (B, n) of tokens taken as anchors."""
        batch, num_tokens, hidden_size = x.shape
        slots = self.max_anchors
        if slots == 0 or anchor is None or num_tokens == 0:
            return (x.new_zeros(batch, slots, hidden_size), x.new_zeros(batch, slots),
                    torch.zeros(batch, num_tokens, dtype=torch.bool, device=x.device))
        flagged = anchor.to(torch.bool) & valid  # (B, n)
        order = torch.cumsum(flagged.to(torch.int64), dim=1) - 1  # (B, n): rank among the row's anchors
        taken = flagged & (order < slots)  # (B, n); extras fall back into their segment's mean
        positions = torch.arange(num_tokens, device=x.device).expand(batch, num_tokens)
        # sort key puts the taken tokens first, in position order
        key = torch.where(taken, positions, positions + num_tokens)
        index = torch.argsort(key, dim=1)[:, :slots]  # (B, min(A, n))
        index = torch.nn.functional.pad(index, (0, slots - index.shape[1]))  # (B, A)
        slot_used = torch.arange(slots, device=x.device).unsqueeze(0) < taken.sum(dim=1, keepdim=True)  # (B, A)
        gathered = torch.gather(x, 1, index.unsqueeze(-1).expand(batch, slots, hidden_size))  # (B, A, d)
        vectors = gathered * slot_used.unsqueeze(-1)
        return vectors, slot_used.to(torch.float32), taken

