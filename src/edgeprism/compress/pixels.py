"""The "levels" wire form of raw pixels: lossless, about 4x under float32, for images that came from 8 bits.

Images arrive with 8 bits per channel; after the usual preprocessing (resize in uint8, x * 1/255, then
(x - mean) / std: inputs/image.py) each channel of `pixel_values` takes at most 256 distinct float values.
A part whose channels each take <= `MAX_LEVELS` values travels as one uint8 code per value plus each
channel's table of levels, (channels, L) in the part's own dtype; the receiver gathers the table at the
codes and has the same tensor back, bit for bit. Values are told apart by their bit patterns (an integer
view), so -0.0 and 0.0 or two NaNs of different payloads stay distinct and come back as they were. A part
with more levels (standard-normal test pixels, a 16-bit image) is not encoded: `encode_levels` says None.

Layout: the part's last dimension holds its channels channel-major, `channels` equal blocks (a ViT patch is
(C, P, P) flattened). The model declares which of its raw parts are such and how many channels they have
(`models.base.ReferenceModel.pixel_channels`); nothing here guesses it.

Method, measured (scripts/bench_pixels.py, one thread, a busy 2-core host at load 3.5-6): for a ViT-B/16 batch-8
half image (602 k values) `torch.unique` per channel over the float values took 32-74 ms, over the same values
viewed as int32 6-9 ms, and that one is exact by construction (its inverse indices are the codes). Float
`unique(sorted=False)` (33-69 ms) and a sampled palette with `searchsorted` (31-140 ms) were no faster.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from edgeprism.compress.base import WireSpec

MAX_LEVELS = 256
"""Distinct values per channel a uint8 code can name."""
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.float64: torch.int64}
"""The integer view whose equality is bitwise equality of the float dtype."""
_PROBE_VALUES = 1024
"""Values per channel looked at first: a part with more than 256 levels almost always shows it here, so
standard-normal pixels are refused for ~0.1 ms instead of a full pass."""


def levels_spec(shape: tuple[int, ...], dtype: torch.dtype, channels: int, num_levels: int) -> WireSpec:
    """The wire tensors of a part of `shape` and `dtype` in the levels form: codes, then the table."""
    return [(tuple(shape), torch.uint8), ((channels, num_levels), dtype)]


def encode_levels(part: Tensor, channels: int) -> tuple[Tensor, Tensor] | None:
    """part (..., channels * K), channel-major in its last dimension -> (codes: uint8 of part's shape, table:
    (channels, L) of part's dtype, L <= 256), or None when some channel takes more than 256 values, the dtype
    is not floating point, or the levels form would not be smaller than the part itself."""
    bits = _BITS.get(part.dtype)
    if bits is None or part.dim() == 0 or part.numel() == 0 or channels < 1 or part.shape[-1] % channels:
        return None
    per_channel = part.contiguous().view(bits).reshape(-1, channels, part.shape[-1] // channels)  # (N, C, K)
    probe_rows = math.ceil(_PROBE_VALUES / per_channel.shape[2])
    if any(torch.unique(per_channel[:probe_rows, c]).numel() > MAX_LEVELS for c in range(channels)):
        return None
    codes = torch.empty(per_channel.shape, dtype=torch.uint8, device=part.device)  # (N, C, K)
    levels = []
    for c in range(channels):
        values, inverse = torch.unique(per_channel[:, c], return_inverse=True)  # sorted bit patterns (L_c,), (N, K)
        if values.numel() > MAX_LEVELS:
            return None
        codes[:, c] = inverse
        levels.append(values)
    width = max(v.numel() for v in levels)
    table = torch.zeros(channels, width, dtype=bits, device=part.device)  # (C, L), unused slots 0
    for c, values in enumerate(levels):
        table[c, :values.numel()] = values
    if codes.numel() + table.numel() * table.element_size() >= part.numel() * part.element_size():
        return None
    table = table.view(part.dtype)
    # Exact by construction (unique's inverse indexes its own values); a cheap check of the first rows.
    head = (-1, part.shape[-1])  # the first rows, in the part's layout
    assert torch.equal(decode_levels(codes[:probe_rows].reshape(head), table).view(bits),
                       per_channel[:probe_rows].reshape(head)), "levels round trip"
    return codes.view(part.shape), table


def decode_levels(codes: Tensor, table: Tensor) -> Tensor:
    """codes (..., channels * K) uint8 and table (channels, L) -> the part, in the table's dtype, bit for bit."""
    channels, width = table.shape
    bits = _BITS[table.dtype]
    index = codes.reshape(-1, channels, codes.shape[-1] // channels).long()  # (N, C, K)
    index += torch.arange(channels, device=codes.device)[:, None] * width  # row c of the flat table
    return table.contiguous().view(bits).reshape(-1).take(index).view(table.dtype).reshape(codes.shape)


__all__ = ["MAX_LEVELS", "decode_levels", "encode_levels", "levels_spec"]
