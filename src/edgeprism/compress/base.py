"""The codec seam: what one rank sends of its hidden states each layer, and how it is read back.

A codec turns a rank's own hidden states (B, n, d) into a list of *wire tensors* whose shapes and
dtypes are a deterministic function of (batch, num_tokens, hidden_size) alone, so every rank can
allocate receive buffers for every other rank without a size exchange. Decoding returns the vectors
the receiver attends to and, per vector, the number of real tokens it stands for (0 = masked out).

Contract (tests pin it):
- `wire_spec(B, n, d)` == [(t.shape, t.dtype) for t in encode(...)] for any valid input.
- `nbytes(B, n, d)` == sum of the wire tensors' byte sizes (exact, counts and scales included).
- `decode(encode(h, valid, anchor))` gives vectors (B, S, d) float32 and counts (B, S) float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

WireSpec = list[tuple[tuple[int, ...], torch.dtype]]


@runtime_checkable
class Codec(Protocol):
    """What travels between ranks. Implementations are frozen dataclasses (printable, comparable)."""

    @property
    def name(self) -> str:
        """The name the CLI and the profile use (e.g. "fp32", "sm4+int8")."""
        ...

    def wire_spec(self, batch: int, num_tokens: int, hidden_size: int) -> WireSpec: ...

    def encode(self, hidden: Tensor, valid: Tensor, anchor: Tensor | None = None) -> list[Tensor]:
        """hidden (B, n, d); valid (B, n) bool, False for padding; anchor (B, n) bool or None."""
        ...

    def decode(self, wire: list[Tensor]) -> tuple[Tensor, Tensor]:
        """-> vectors (B, S, d) float32, counts (B, S) float32 (0 = masked out)."""
        ...

    def nbytes(self, batch: int, num_tokens: int, hidden_size: int) -> int: ...


def spec_nbytes(spec: WireSpec) -> int:
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in spec)


@dataclass(frozen=True)
class IdentityCodec:
    """Full-tensor exchange (CR = 1) in a float wire dtype; counts are the valid mask (1 byte/token)."""

    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    def wire_spec(self, batch: int, num_tokens: int, hidden_size: int) -> WireSpec:
        return [((batch, num_tokens, hidden_size), self.dtype), ((batch, num_tokens), torch.uint8)]

    def encode(self, hidden: Tensor, valid: Tensor, anchor: Tensor | None = None) -> list[Tensor]:
        return [hidden.to(self.dtype).contiguous(), valid.to(torch.uint8).contiguous()]

    def decode(self, wire: list[Tensor]) -> tuple[Tensor, Tensor]:
        values, valid = wire
        return values.to(torch.float32), valid.to(torch.float32)

    def nbytes(self, batch: int, num_tokens: int, hidden_size: int) -> int:
        return spec_nbytes(self.wire_spec(batch, num_tokens, hidden_size))

    def num_vectors(self, num_tokens: int) -> int:
        """Vectors a receiver attends to for a sender of `num_tokens` tokens: all of them."""
        return num_tokens

    def __str__(self) -> str:
        return self.name


def pack(wire: list[Tensor]) -> Tensor:
    """Concatenate wire tensors into one flat uint8 tensor (one collective per exchange)."""
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in wire]) if wire else torch.empty(0, dtype=torch.uint8)


def unpack(buffer: Tensor, spec: WireSpec) -> list[Tensor]:
    """Inverse of `pack` for a buffer whose first `spec_nbytes(spec)` bytes hold the tensors."""
    out: list[Tensor] = []
    offset = 0
    for shape, dtype in spec:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        # clone: a byte slice at an unaligned offset cannot be re-viewed as a wider dtype
        out.append(buffer[offset : offset + size].clone().view(dtype).view(shape))
        offset += size
    return out
