"""Value formats: how a block of vectors (B, S, d) is written on the wire, and read back.

A value format is the precision layer of a codec. The plain quantising codecs apply one to every
token; Segment Means applies one to its means (and anchor tokens). Wire shapes depend only on
(B, S, d), like the codec contract in `base.py`.

| name   | wire tensors                                   | bytes per vector (d = 768)        |
|--------|------------------------------------------------|-----------------------------------|
| fp32   | (B,S,d) float32                                | 4d = 3072                         |
| fp16   | (B,S,d) float16                                | 2d = 1536                         |
| bf16   | (B,S,d) bfloat16                               | 2d = 1536                         |
| int8   | (B,S,d) int8 + (B,S) scale                     | d + 2 = 770 (fp16 scale)          |
| int8c  | (B,S,d) int8 + (B,d) scale                     | d, plus 2d per row and message    |
| int4   | (B,S,ceil(d/2)) uint8 + (B,S,ceil(d/g)) scale  | d/2 + 2·d/g = 432 (g = 32)        |

All integer formats are symmetric absmax quantisers: scale = absmax / qmax, q = round(x / scale)
clamped to [-qmax, qmax]. The scale is rounded to its wire dtype *before* quantising, so encoder and
decoder use the same scale; a zero block gets scale 0 and decodes to zeros. Scales saturate at the
largest finite value of their dtype (fp16: 65504, i.e. |x| beyond ~8.3e6 clips for int8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from edgeprism.compress.base import WireSpec

_FLOAT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_SCALE_NAMES = {torch.float16: "fp16", torch.float32: "fp32"}


@runtime_checkable
class ValueFormat(Protocol):
    """Encodes (B, S, d) float vectors into wire tensors whose shapes depend only on (B, S, d)."""

    @property
    def name(self) -> str: ...

    def wire_spec(self, batch: int, num_vectors: int, hidden_size: int) -> WireSpec: ...

    def encode(self, values: Tensor) -> list[Tensor]:
        """values (B, S, d) float -> wire tensors, in `wire_spec` order."""
        ...

    def decode(self, wire: list[Tensor]) -> Tensor:
        """-> (B, S, d) float32."""
        ...


def _check_scale_dtype(scale_dtype: torch.dtype, fmt: str) -> None:
    if scale_dtype not in _SCALE_NAMES:
        raise ValueError(f"{fmt} scale dtype {scale_dtype} is not supported; use torch.float16 or torch.float32")


def _to_scale(absmax: Tensor, qmax: int, scale_dtype: torch.dtype) -> Tensor:
    """absmax (float32) -> scale in its wire dtype, saturated at the dtype's largest finite value."""
    scale = (absmax.to(torch.float32) / qmax).clamp(max=torch.finfo(scale_dtype).max)
    return scale.to(scale_dtype)


def _quantise(values: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """values float32 and a broadcastable wire-dtype scale -> integers in [-qmax, qmax] (float32)."""
    s = scale.to(torch.float32)
    safe = torch.where(s > 0, s, torch.ones_like(s))  # scale 0 <=> block is all zeros
    return torch.round(values / safe).clamp(-qmax, qmax)


@dataclass(frozen=True)
class FloatFormat:
    """Plain float wire (fp32 / fp16 / bf16)."""

    tokenwise = True
    """Each vector is encoded on its own (`compress.base.splits_by_token`)."""

    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.dtype not in _FLOAT_NAMES:
            raise ValueError(f"float wire dtype {self.dtype} is not supported; use float32, float16 or bfloat16")

    @property
    def name(self) -> str:
        return _FLOAT_NAMES[self.dtype]

    def wire_spec(self, batch: int, num_vectors: int, hidden_size: int) -> WireSpec:
        return [((batch, num_vectors, hidden_size), self.dtype)]

    def encode(self, values: Tensor) -> list[Tensor]:
        return [values.to(self.dtype).contiguous()]

    def decode(self, wire: list[Tensor]) -> Tensor:
        return wire[0].to(torch.float32)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Int8TokenFormat:
    """int8 with one absmax scale per vector: |error| <= scale/2 = absmax/254 per element."""

    tokenwise = True
    """One scale per vector: each is encoded on its own."""

    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        _check_scale_dtype(self.scale_dtype, "int8")

    @property
    def name(self) -> str:
        return "int8" if self.scale_dtype == torch.float16 else "int8s32"

    def wire_spec(self, batch: int, num_vectors: int, hidden_size: int) -> WireSpec:
        return [((batch, num_vectors, hidden_size), torch.int8), ((batch, num_vectors), self.scale_dtype)]

    def encode(self, values: Tensor) -> list[Tensor]:
        x = values.to(torch.float32)
        scale = _to_scale(x.abs().amax(dim=-1), 127, self.scale_dtype)  # (B, S)
        q = _quantise(x, scale.unsqueeze(-1), 127).to(torch.int8)  # (B, S, d)
        return [q.contiguous(), scale.contiguous()]

    def decode(self, wire: list[Tensor]) -> Tensor:
        q, scale = wire
        return q.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Int8ChannelFormat:
    """int8 with one absmax scale per channel, computed over the vectors of each row of one message.

    Suits BERT-style models whose residual stream has a few large outlier dimensions that are the
    same for every token: those channels get their own coarse scale instead of crushing the
    resolution of all other channels of every token. |error| <= channel absmax / 254.
    """

    tokenwise = False
    """One scale per channel across the vectors: a vector's code depends on the others."""

    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        _check_scale_dtype(self.scale_dtype, "int8c")

    @property
    def name(self) -> str:
        return "int8c" if self.scale_dtype == torch.float16 else "int8cs32"

    def wire_spec(self, batch: int, num_vectors: int, hidden_size: int) -> WireSpec:
        return [((batch, num_vectors, hidden_size), torch.int8), ((batch, hidden_size), self.scale_dtype)]

    def encode(self, values: Tensor) -> list[Tensor]:
        x = values.to(torch.float32)
        batch, _, hidden = x.shape
        if x.shape[1] == 0:
            absmax = x.new_zeros(batch, hidden)
        else:
            absmax = x.abs().amax(dim=1)  # (B, d)
        scale = _to_scale(absmax, 127, self.scale_dtype)  # (B, d)
        q = _quantise(x, scale.unsqueeze(1), 127).to(torch.int8)  # (B, S, d)
        return [q.contiguous(), scale.contiguous()]

    def decode(self, wire: list[Tensor]) -> Tensor:
        q, scale = wire
        return q.to(torch.float32) * scale.to(torch.float32).unsqueeze(1)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Int4GroupFormat:
    """int4 in groups of `group_size` consecutive channels, one absmax scale per group.

    Values are in [-7, 7] (symmetric), stored as value + 8 in a nibble, two per byte (element 2i in
    the low nibble, 2i+1 in the high one); an odd d pads one zero nibble, which is how decode tells d
    from the wire alone (real nibbles are never 0). The last group may be
    shorter when d is not a multiple of the group size. |error| <= group absmax / 14.
    """

    tokenwise = True
    """Groups of channels within a vector: each vector is encoded on its own."""

    group_size: int = 32
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"int4 group size {self.group_size} must be >= 1 (e.g. int4g32)")
        _check_scale_dtype(self.scale_dtype, "int4")

    @property
    def name(self) -> str:
        base = "int4" if self.group_size == 32 else f"int4g{self.group_size}"
        return base if self.scale_dtype == torch.float16 else base + "s32"

    def wire_spec(self, batch: int, num_vectors: int, hidden_size: int) -> WireSpec:
        num_groups = math.ceil(hidden_size / self.group_size)
        return [((batch, num_vectors, math.ceil(hidden_size / 2)), torch.uint8),
                ((batch, num_vectors, num_groups), self.scale_dtype)]

    def encode(self, values: Tensor) -> list[Tensor]:
        x = values.to(torch.float32)
        batch, num_vectors, hidden = x.shape
        num_groups = math.ceil(hidden / self.group_size)
        padded = torch.nn.functional.pad(x, (0, num_groups * self.group_size - hidden))
        grouped = padded.view(batch, num_vectors, num_groups, self.group_size)  # (B, S, G, g)
        scale = _to_scale(grouped.abs().amax(dim=-1), 7, self.scale_dtype)  # (B, S, G)
        q = _quantise(grouped, scale.unsqueeze(-1), 7).view(batch, num_vectors, -1)[..., :hidden]
        nibbles = (q + 8).to(torch.uint8)  # (B, S, d) in [1, 15]
        if hidden % 2:
            nibbles = torch.nn.functional.pad(nibbles, (0, 1))  # (B, S, d + 1)
        packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)  # (B, S, ceil(d/2))
        return [packed.contiguous(), scale.contiguous()]

    def decode(self, wire: list[Tensor]) -> Tensor:
        packed, scale = wire
        batch, num_vectors, num_bytes = packed.shape
        num_groups = scale.shape[-1]
        # d is 2·num_bytes, or one less when the last high nibble is the zero pad (real nibbles are >= 1).
        # An empty message (no vectors) cannot tell, and decodes with the even width.
        odd = packed.numel() > 0 and int(packed.reshape(-1, num_bytes)[0, -1]) >> 4 == 0
        hidden = 2 * num_bytes - int(odd)
        nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(batch, num_vectors, -1)  # (B, S, 2·ceil(d/2))
        q = nibbles[..., :hidden].to(torch.float32) - 8  # (B, S, d)
        width = num_groups * self.group_size
        q = torch.nn.functional.pad(q, (0, width - hidden))  # (B, S, G·g)
        grouped = q.view(batch, num_vectors, num_groups, self.group_size) * scale.to(torch.float32).unsqueeze(-1)
        return grouped.view(batch, num_vectors, width)[..., :hidden]

    def __str__(self) -> str:
        return self.name
