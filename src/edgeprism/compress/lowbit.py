"""Sub-4-bit value formats for residual streams with outlier channels, and a codec with a bit-packed mask.

`LowBitFormat` ("lb3o4r": 3 bits, 4 outliers, rotated) writes each vector as

1. its `outliers` largest-|x| channels exact in fp16, with their channel index (uint16). BERT-family
   residual streams carry a few channels ~15x the typical magnitude (MiniLM-L6: channel 99 ~10 vs
   rms ~0.6); a per-vector scale that has to cover them crushes every other channel.
2. the rest (outliers zeroed), optionally rotated by a fixed random orthogonal matrix (`rotate`; the
   same on every rank: seeded by d), which makes the coordinates close to Gaussian (QuaRot / QuIP#
   incoherence processing, applied here to activations on the wire);
3. quantised with one fp16 scale per vector: for `bits` <= 4 the scale is the vector's RMS and the
   levels are the Lloyd-Max levels of a unit Gaussian (MSE-optimal for it; Max 1960), for 5-8
   bits a symmetric absmax uniform grid. Codes are bit-packed, `bits` per element.

Bytes per vector: ceil(d·bits/8) + 2 (scale) + 4·outliers (+ 2 per message for d). d = 384,
lb3o4r: 144 + 2 + 16 = 162.

`PackedMaskCodec` sends every token in a value format plus the valid mask as bits (ceil(n/8) bytes per
row instead of n), which matters once a token costs ~150 bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from edgeprism.compress.base import EveryTokenCodec, WireSpec, check_inputs
from edgeprism.compress.formats import ValueFormat

LLOYD_MAX_GAUSSIAN = {
    # positive half of the MSE-optimal reconstruction levels for a unit Gaussian (Max 1960, Table I)
    2: (0.4528, 1.5104),
    3: (0.2451, 0.7560, 1.3439, 2.1519),
    4: (0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6180, 2.0690, 2.7326),
}
"""Levels for `bits` <= 4, in units of the vector's RMS; each level set is symmetric (2^bits levels)."""

ROTATION_SEED = 20240601
"""Seed of the fixed rotation: every rank builds the same d x d orthogonal matrix from it."""


def rotation_matrix(hidden_size: int, seed: int = ROTATION_SEED) -> Tensor:
    """A fixed random orthogonal (d, d) float32 matrix: QR of a seeded Gaussian, signs fixed by diag(R)."""
    gen = torch.Generator().manual_seed(seed + hidden_size)
    q, r = torch.linalg.qr(torch.randn(hidden_size, hidden_size, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).to(torch.float32)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """codes (..., m) integers in [0, 2^bits) -> (..., ceil(m·bits/8)) uint8, little-endian bit order."""
    *lead, m = codes.shape
    shifts = torch.arange(bits, device=codes.device)
    bit_planes = ((codes.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(*lead, m * bits)  # (..., m·bits)
    num_bytes = math.ceil(m * bits / 8)
    bit_planes = torch.nn.functional.pad(bit_planes, (0, num_bytes * 8 - m * bits)).reshape(*lead, num_bytes, 8)
    return (bit_planes << torch.arange(8, device=codes.device)).sum(-1).to(torch.uint8)  # (..., num_bytes)


def unpack_bits(packed: Tensor, bits: int, m: int) -> Tensor:
    """Inverse of `pack_bits`: (..., ceil(m·bits/8)) uint8 -> (..., m) int64."""
    *lead, num_bytes = packed.shape
    bit_planes = (packed.to(torch.int64).unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1
    bit_planes = bit_planes.reshape(*lead, num_bytes * 8)[..., : m * bits].reshape(*lead, m, bits)
    return (bit_planes << torch.arange(bits, device=packed.device)).sum(-1)


@dataclass(frozen=True)
class LowBitFormat:
    """`bits`-bit codes with one fp16 scale per vector, `outliers` exact fp16 channels, optional rotation.

    Wire: [codes (B, S, ceil(d·bits/8)) uint8, scale (B, S, 1) fp16, outlier index (B, S, k) int16,
    outlier values (B, S, k) fp16, width (1,) int16 = d], k = min(outliers, d). The 2-byte width
    makes decode exact for every d (the packed code width alone is ambiguous when 8 ∤ d·bits).
    """

    tokenwise = True
    """One scale, outliers and rotation per vector: each is encoded on its own."""

    bits: int = 3
    outliers: int = 0
    rotate: bool = False
    _rotation: dict = field(default_factory=dict, compare=False, repr=False, hash=False)
    """Per-instance cache {d: (d, d) matrix} (a pure function of d; filled on first use)."""

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"low-bit format bits {self.bits!r} must be an integer in 2..8 (e.g. lb3)")
        if isinstance(self.outliers, bool) or not isinstance(self.outliers, int) or self.outliers < 0:
            raise ValueError(f"low-bit format outliers {self.outliers!r} must be an integer >= 0 (e.g. lb3o4)")

    @property
    def name(self) -> str:
        return f"lb{self.bits}" + (f"o{self.outliers}" if self.outliers else "") + ("r" if self.rotate else "")

    def wire_spec(self, batch: int, num_vectors: int, hidden_size: int) -> WireSpec:
        k = min(self.outliers, hidden_size)
        return [((batch, num_vectors, math.ceil(hidden_size * self.bits / 8)), torch.uint8),
                ((batch, num_vectors, 1), torch.float16),
                ((batch, num_vectors, k), torch.int16),
                ((batch, num_vectors, k), torch.float16),
                ((1,), torch.int16)]

    def _rot(self, hidden_size: int, device: torch.device) -> Tensor:
        if hidden_size not in self._rotation:
            self._rotation[hidden_size] = rotation_matrix(hidden_size)
        return self._rotation[hidden_size].to(device)

    def _levels(self, device: torch.device) -> Tensor:
        half = torch.tensor(LLOYD_MAX_GAUSSIAN[self.bits], device=device)
        return torch.cat([-half.flip(0), half])  # (2^bits,) ascending

    def encode(self, values: Tensor) -> list[Tensor]:
        x = values.to(torch.float32)
        batch, num_vectors, hidden = x.shape
        k = min(self.outliers, hidden)
        index = x.abs().topk(k, dim=-1).indices if k else x.new_zeros(batch, num_vectors, 0, dtype=torch.int64)
        outlier_values = torch.gather(x, -1, index).to(torch.float16)  # (B, S, k)
        rest = x.scatter(-1, index, 0.0)  # (B, S, d)
        if self.rotate:
            rest = rest @ self._rot(hidden, x.device)  # (B, S, d)
        if self.bits <= 4:
            scale = rest.pow(2).mean(-1, keepdim=True).sqrt().to(torch.float16)  # (B, S, 1) RMS
            s = scale.to(torch.float32)
            z = rest / torch.where(s > 0, s, torch.ones_like(s))
            levels = self._levels(x.device)
            edges = (levels[1:] + levels[:-1]) / 2  # decision thresholds
            codes = torch.bucketize(z.contiguous(), edges)  # (B, S, d) in [0, 2^bits)
        else:
            qmax = 2 ** (self.bits - 1) - 1
            scale = (rest.abs().amax(-1, keepdim=True) / qmax).clamp(max=65504).to(torch.float16)
            s = scale.to(torch.float32)
            codes = (torch.round(rest / torch.where(s > 0, s, torch.ones_like(s))).clamp(-qmax, qmax) + qmax)
        width = torch.tensor([hidden], dtype=torch.int16)
        return [pack_bits(codes, self.bits), scale.contiguous(), index.to(torch.int16).contiguous(),
                outlier_values.contiguous(), width]

    def decode(self, wire: list[Tensor]) -> Tensor:
        packed, scale, index, outlier_values, width = wire
        hidden_size = int(width[0])
        codes = unpack_bits(packed, self.bits, hidden_size)  # (B, S, d)
        s = scale.to(torch.float32)
        if self.bits <= 4:
            rest = self._levels(packed.device)[codes] * s
        else:
            qmax = 2 ** (self.bits - 1) - 1
            rest = (codes - qmax).to(torch.float32) * s
        if self.rotate:
            rest = rest @ self._rot(hidden_size, packed.device).T
        return rest.scatter(-1, index.to(torch.int64), outlier_values.to(torch.float32))

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class PackedMaskCodec(EveryTokenCodec):
    """Every token travels in `values` (a `LowBitFormat` or any value format); the valid mask as bits.

    Wire: [*values (B, n, d), mask (B, ceil(n/8)) uint8].
    """

    values: ValueFormat = field(default_factory=LowBitFormat)

    def wire_spec(self, batch: int, num_tokens: int, hidden_size: int) -> WireSpec:
        return [*self.values.wire_spec(batch, num_tokens, hidden_size),
                ((batch, math.ceil(num_tokens / 8)), torch.uint8)]

    def encode(self, hidden: Tensor, valid: Tensor, anchor: Tensor | None = None) -> list[Tensor]:
        check_inputs(hidden, valid, anchor, self.name)
        x = hidden.to(torch.float32) * valid.unsqueeze(-1)  # padding zeroed
        return [*self.values.encode(x), pack_bits(valid.to(torch.int64), 1)]

    def decode(self, wire: list[Tensor]) -> tuple[Tensor, Tensor]:
        *values, mask = wire
        num_tokens = values[0].shape[1]
        vectors = self.values.decode(values)
        counts = unpack_bits(mask, 1, num_tokens).to(torch.float32)  # (B, n)
        return vectors, counts
