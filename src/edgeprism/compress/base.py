"""The codec seam: what one rank sends of its hidden states each layer, and how it is read back.

A codec turns a rank's own hidden states (B, n, d) into a list of *wire tensors* whose shapes and
dtypes are a deterministic function of (batch, num_tokens, hidden_size) alone, so every rank can
allocate receive buffers for every other rank without a size exchange. Decoding returns the vectors
the receiver attends to and, per vector, the number of real tokens it stands for (0 = masked out).

Contract (tests pin it):
- `wire_spec(B, n, d)` == [(t.shape, t.dtype) for t in encode(...)] for any valid input.
- `nbytes(B, n, d)` == sum of the wire tensors' byte sizes (exact, counts and scales included).
- `decode(encode(h, valid, anchor))` gives vectors (B, S, d) float32 and counts (B, S) float32, with
  S == `num_vectors(n)`: the K/V rows a receiver computes, which the cost model charges (`plan/cost.py`
  asks the codec through the profile's `CodecFidelity.num_vectors`).

A new codec is one module plus its registry line (`compress.registry.register_codec`); docs/ADDING.md.
Codecs that send values in a `ValueFormat` then one counts tensor share `ValueCodec` (name, decode,
nbytes, str); those that send every token share `EveryTokenCodec` (ratio 1, no extra vectors).
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

    @property
    def ratio(self) -> int:
        """Tokens per compressed vector (1: every token travels): the profile's `cr`."""
        ...

    @property
    def extra_vectors(self) -> int:
        """Exact vectors per row sent besides the compressed ones (anchor slots); 0 for most codecs."""
        ...

    def num_vectors(self, num_tokens: int) -> int:
        """Vectors (K/V rows) a receiver attends to per row for a sender holding `num_tokens` tokens."""
        ...


def check_inputs(hidden: Tensor, valid: Tensor, anchor: Tensor | None, codec: str) -> None:
    """ValueError naming the shapes when `encode` is given hidden states and masks that do not match."""
    if hidden.dim() != 3:
        raise ValueError(f"{codec}: hidden states have shape {tuple(hidden.shape)}; expected (batch, tokens, hidden)")
    if tuple(valid.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"{codec}: valid mask has shape {tuple(valid.shape)}; hidden states "
                         f"{tuple(hidden.shape)} need ({hidden.shape[0]}, {hidden.shape[1]})")
    if anchor is not None and tuple(anchor.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"{codec}: anchor mask has shape {tuple(anchor.shape)}; hidden states "
                         f"{tuple(hidden.shape)} need ({hidden.shape[0]}, {hidden.shape[1]})")


def spec_nbytes(spec: WireSpec) -> int:
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in spec)


class ValueCodec:
    """Shared by codecs (frozen dataclasses) whose wire is their `values` format's tensors followed by one
    counts tensor: the name is the format's, `decode` reads values then counts, `nbytes` sums the wire
    spec. Subclasses give `values`, `wire_spec`, `encode`, `ratio`/`extra_vectors`/`num_vectors`, and
    override whatever differs."""

    @property
    def name(self) -> str:
        return self.values.name  # type: ignore[attr-defined]

    def decode(self, wire: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self.values.decode(wire[:-1]), wire[-1].to(torch.float32)  # type: ignore[attr-defined]

    def nbytes(self, batch: int, num_tokens: int, hidden_size: int) -> int:
        return spec_nbytes(self.wire_spec(batch, num_tokens, hidden_size))  # type: ignore[attr-defined]

    def __str__(self) -> str:
        return self.name


class EveryTokenCodec(ValueCodec):
    """A `ValueCodec` that sends every token: ratio 1, no extra vectors, n vectors for n tokens."""

    ratio = 1
    extra_vectors = 0

    def num_vectors(self, num_tokens: int) -> int:
        return num_tokens


@dataclass(frozen=True)
class IdentityCodec(EveryTokenCodec):
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


def splits_by_token(codec: object) -> bool:
    """Whether encoding any contiguous split of the tokens, piece by piece, sends what encoding them whole sends,
    vector for vector (up to the float rounding of a rotated format's matrix product over fewer rows): a
    stateless codec (no `session`) that sends every token each on its own (the identity, or `values` in a
    per-vector format: `tokenwise`). A rank may then send its vectors in token chunks as it produces them
    (partition/overlapped.py)."""
    if hasattr(codec, "session") or not isinstance(codec, EveryTokenCodec):
        return False
    return isinstance(codec, IdentityCodec) or bool(getattr(getattr(codec, "values", None), "tokenwise", False))


def pack(wire: list[Tensor]) -> Tensor:
    """Concatenate wire tensors into one flat uint8 tensor (one collective per exchange)."""
    return (
        torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in wire])
        if wire
        else torch.empty(0, dtype=torch.uint8)
    )


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
