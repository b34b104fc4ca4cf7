"""Rank 0's scatter of the raw input parts: each part's wire form and the header's spec of it.

A part is a few named tensors (`ReferenceModel.split_input`). Those the model declares as pixels
(`ReferenceModel.pixel_channels`) travel in the lossless levels form when their values allow it
(compress/pixels.py: uint8 codes plus each channel's levels, about 4x under float32 for images that came
from 8 bits); everything else, and pixels with more levels, as it is. Rank 0 decides per part and request;
the header names each tensor's form, so a receiver knows the bytes to expect and how to read them:
`{key: [shape, dtype]}` as it is, `{key: [shape, dtype, [channels, levels]]}` in the levels form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edgeprism.compress.base import WireSpec, spec_nbytes
from edgeprism.compress.pixels import decode_levels, encode_levels, levels_spec
from edgeprism.models.base import Inputs, ReferenceModel

DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                              torch.uint8, torch.bool)}
"""Part dtypes by the name the header carries."""
PROBE_TOKENS = 16
"""Tokens `scatter_ratio` encodes to predict a request's scatter (about 1 ms with ViT-B/16's split on one core)."""
TABLE_SUFFIX = ".levels"
"""In a part's wire form, the key of a levels-form tensor's table (the key itself holds its codes)."""


def wire_part(model: ReferenceModel, part: Inputs) -> tuple[dict[str, list], Inputs]:
    """Rank 0: a raw part -> (its header spec, its wire form: the tensors as they travel, by key)."""
    declared = model.pixel_channels()
    spec: dict[str, list] = {}
    wire: Inputs = {}
    for key in sorted(part):
        value = part[key].contiguous()
        channels = declared.get(key)
        levels = encode_levels(value, channels) if channels else None
        if levels is None:
            spec[key] = [list(value.shape), str(value.dtype)]
            wire[key] = value
        else:
            codes, table = levels
            spec[key] = [list(value.shape), str(value.dtype), list(table.shape)]
            wire[key], wire[key + TABLE_SUFFIX] = codes, table
    return spec, wire


def raw_spec(part: Inputs) -> dict[str, list]:
    """The header spec of a part that travels as it is (or not at all: rank 0's own)."""
    return {key: [list(value.shape), str(value.dtype)] for key, value in sorted(part.items())}


def wire_tensors(spec: dict[str, list], wire: Inputs) -> list[Tensor]:
    """A part's wire form in the order `part_wire_spec` reads it back (for `compress.base.pack`)."""
    out = []
    for key in sorted(spec):
        out.append(wire[key])
        if len(spec[key]) == 3:
            out.append(wire[key + TABLE_SUFFIX])
    return out


def part_wire_spec(spec: dict[str, list]) -> WireSpec:
    """Shapes and dtypes of a part's wire tensors, from its header spec (the receiver's side)."""
    out: WireSpec = []
    for key in sorted(spec):
        shape, dtype = tuple(spec[key][0]), DTYPES[spec[key][1]]
        if len(spec[key]) == 3:
            channels, num_levels = spec[key][2]
            out += levels_spec(shape, dtype, channels, num_levels)
        else:
            out.append((shape, dtype))
    return out


def read_part(spec: dict[str, list], tensors: list[Tensor]) -> Inputs:
    """The receiver: the unpacked wire tensors (`part_wire_spec`) -> the part, bit for bit as rank 0 cut it."""
    part: Inputs = {}
    index = 0
    for key in sorted(spec):
        if len(spec[key]) == 3:
            part[key] = decode_levels(tensors[index], tensors[index + 1])
            index += 2
        else:
            part[key] = tensors[index]
            index += 1
    return part


def scatter_ratio(model: ReferenceModel, inputs: Inputs, num_tokens: int) -> float | None:
    """Wire bytes over raw bytes of this request's scatter, for the cost model (`plan.Request.input_bytes_per_token`):
    probed on `PROBE_TOKENS` tokens of the first row from the middle on, each table charged once per the request's
    rows of the last half of the tokens (where the profile's `input_bytes_per_token` was measured:
    profile/profiler.py). None when the model declares no pixels or the probe's would travel as they are. A
    prediction: `split` decides each part exactly."""
    if not model.pixel_channels() or num_tokens < 2:
        return None
    start = (num_tokens + 1) // 2
    end = min(num_tokens, start + PROBE_TOKENS)
    part = model.split_input({key: value[:1] for key, value in inputs.items()}, start, end)
    spec, wire = wire_part(model, part)
    tables = [wire[key + TABLE_SUFFIX] for key in spec if len(spec[key]) == 3]
    if not tables:
        return None
    raw_bytes = sum(v.numel() * v.element_size() for v in part.values())
    table_bytes = sum(t.numel() * t.element_size() for t in tables)
    per_token_bytes = spec_nbytes(part_wire_spec(spec)) - table_bytes
    batch = next(iter(inputs.values())).shape[0]  # request inputs are batch-first (models/base.py)
    return per_token_bytes / raw_bytes + table_bytes / (raw_bytes * batch * (num_tokens - start) / (end - start))


__all__ = ["DTYPES", "PROBE_TOKENS", "TABLE_SUFFIX", "part_wire_spec", "raw_spec", "read_part", "scatter_ratio",
           "wire_part", "wire_tensors"]
