"""A share of each rank's tokens travels as keys and values instead of hidden states ("kv50:int8").

Why: a rank that receives another rank's hidden states projects their keys and values itself, on its own core.
At P ranks every token's K/V is projected P times (once by its owner, once by each receiver): at 4 ranks the
received tokens' K/V projections are about a third of a split layer's compute (docs/METHODOLOGY.md,
`scripts/bench_layer.py --ranks 4`). Sending a token's keys and values instead costs the receiver nothing to
project but puts two vectors on the wire instead of one. A share between 0 and 100 % of each rank's tokens
balances the wire against the compute; the planner picks it per plan from the profile (plan/cost.py).

What travels, per row of a sender's n own tokens with k = `kv_tokens(n)` of them sent as keys and values (the
last k, in position order): m = n - k normalised K/V inputs (what a hidden-state exchange sends: the block's
`kv_input`), then the k tokens' keys, then their values, each a vector of the model's hidden size (keys and
values in the heads-merged layout, head after head), all in the inner format. Keys and values are linear in the
normalised input (K = W_k x + b_k), so at fp32 this is the same attention, exact up to float rounding.

The transform (`partition/transform.py`) builds the message (`kv_message`) and reads it back (`kv_split`); the
codec itself only encodes the message's m + 2k vectors with its inner every-token format. Only encoders whose
blocks split their attention (`models.base.SplitBlock`) under the overlapped path can use it; decoders exchange
keys and values already (`models.base.KVExchangeBlock`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from edgeprism.compress.base import Codec, WireSpec, spec_nbytes

NAME = re.compile(r"kv(?P<percent>\d+):(?P<inner>.+)")
"""`kv<P>:<format>`, P in 1..100 percent of each rank's tokens sent as keys and values."""


@dataclass(frozen=True)
class KVShareCodec:
    """`inner` (an every-token codec: fp32/fp16/bf16/int8/...) over messages where `percent` % of each rank's
    tokens travel as their keys and values (module docstring)."""

    inner: Codec
    percent: int

    def __post_init__(self) -> None:
        if not 1 <= self.percent <= 100:
            raise ValueError(f"kv share {self.percent}% must be 1..100 (kv50:int8 sends half of each rank's tokens "
                             f"as keys and values)")
        if self.inner.ratio != 1 or self.inner.extra_vectors != 0 or hasattr(self.inner, "session"):
            raise ValueError(f"kv{self.percent}:{self.inner.name}: the inner codec must send every token as it is "
                             f"(a format such as fp16 or int8), not Segment Means, delta or a calibrated codec")

    @property
    def name(self) -> str:
        return f"kv{self.percent}:{self.inner.name}"

    @property
    def ratio(self) -> int:
        return 1

    @property
    def extra_vectors(self) -> int:
        return 0

    def kv_tokens(self, num_tokens: int) -> int:
        """Of a rank's `num_tokens` own tokens, how many travel as keys and values (the last ones)."""
        return (num_tokens * self.percent + 50) // 100

    def num_vectors(self, num_tokens: int) -> int:
        """Keys a receiver attends to per row from a sender of `num_tokens` tokens: every token, once."""
        return num_tokens

    def wire_vectors(self, num_tokens: int) -> int:
        """Vectors on the wire per row: m inputs plus k keys plus k values."""
        return num_tokens + self.kv_tokens(num_tokens)

    def wire_spec(self, batch: int, num_tokens: int, hidden_size: int) -> WireSpec:
        return self.inner.wire_spec(batch, self.wire_vectors(num_tokens), hidden_size)

    def nbytes(self, batch: int, num_tokens: int, hidden_size: int) -> int:
        return spec_nbytes(self.wire_spec(batch, num_tokens, hidden_size))

    def encode(self, message: Tensor, valid: Tensor, anchor: Tensor | None = None) -> list[Tensor]:
        """message (B, m + 2k, d) from `kv_message`, valid (B, m + 2k) likewise."""
        return self.inner.encode(message, valid)

    def decode(self, wire: list[Tensor]) -> tuple[Tensor, Tensor]:
        """-> the message's vectors (B, m + 2k, d), counts (B, m + 2k); `kv_split` reads them."""
        return self.inner.decode(wire)

    def __str__(self) -> str:
        return self.name


def heads_to_rows(x: Tensor) -> Tensor:
    """(B, heads, T, head_dim) -> (B, T, heads · head_dim): the heads-merged layout that travels."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def rows_to_heads(x: Tensor, heads: int) -> Tensor:
    """(B, T, heads · head_dim) -> (B, heads, T, head_dim)."""
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, heads, width // heads).transpose(1, 2)


def kv_message(codec: KVShareCodec, kv_in: Tensor, kv: tuple[Tensor, Tensor], valid: Tensor) -> tuple[Tensor, Tensor]:
    """A rank's message: kv_in (B, n, d) its normalised K/V inputs, kv its keys and values (each
    (B, heads, n, head_dim)), valid (B, n) -> (rows (B, m + 2k, d), their valid mask (B, m + 2k))."""
    n = kv_in.shape[1]
    k = codec.kv_tokens(n)
    m = n - k
    keys = heads_to_rows(kv[0][:, :, m:])  # (B, k, d)
    values = heads_to_rows(kv[1][:, :, m:])
    rows = torch.cat([kv_in[:, :m], keys.to(kv_in.dtype), values.to(kv_in.dtype)], dim=1)
    return rows, torch.cat([valid[:, :m], valid[:, m:], valid[:, m:]], dim=1)


def kv_split(codec: KVShareCodec, rows: Tensor, counts: Tensor, num_tokens: int
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A decoded message of a sender of `num_tokens` tokens -> (inputs (B, m, d), their counts (B, m),
    keys (B, k, d), values (B, k, d), their counts (B, k))."""
    k = codec.kv_tokens(num_tokens)
    m = num_tokens - k
    if rows.shape[1] != m + 2 * k:
        raise ValueError(f"{codec.name}: a message of {rows.shape[1]} vectors cannot hold {num_tokens} tokens "
                         f"({m} inputs + {k} keys + {k} values)")
    return rows[:, :m], counts[:, :m], rows[:, m:m + k], rows[:, m + k:], counts[:, m:m + k]


__all__ = ["NAME", "KVShareCodec", "heads_to_rows", "kv_message", "kv_split", "rows_to_heads"]
