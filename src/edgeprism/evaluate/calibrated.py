"""Fit a calibrated codec (`compress.calibrated`, "tc:<digest>") on the vectors a model really exchanges.

The calibration vectors are what each rank's layer message carries on the real distributed path
(PositionWise over the loopback group, full fp32 exchange): a recording codec stores every valid
token's vector per layer. `calibrate_codec` fits one transform per layer on them. Deterministic: the
same model, batches, world size and budget give the same codec (same digest, same bytes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from edgeprism.compress.base import IdentityCodec, WireSpec, check_inputs
from edgeprism.compress.calibrated import TransformCodec, fit_codec
from edgeprism.evaluate.fidelity import run_distributed
from edgeprism.models.base import Inputs, ReferenceModel

log = logging.getLogger(__name__)

DEFAULT_OUTLIERS = 4
"""Exact components per vector (the ones the codes serve worst): measured on MiniLM's calibration pool,
4 lowers the tail of the per-vector error most for its 16 bytes (0 / 8 / 12 were tried)."""

FP32_BYTES_PER_TOKEN = 4
"""fp32 values per feature; with the 1-byte valid mask, what one token costs under full exchange."""


@dataclass(frozen=True)
class RecordingCodec(IdentityCodec):
    """fp32 exchange (exact) that also keeps, per layer, the valid vectors each rank sent (in `store`)."""

    store: dict = field(default_factory=dict, compare=False, repr=False, hash=False)
    """layer -> list of (N, d) float32 tensors, filled by the sessions."""

    def session(self) -> _RecordingSession:
        return _RecordingSession(self)


@dataclass
class _RecordingSession:
    codec: RecordingCodec

    def wire_spec(self, layer: int, batch: int, num_tokens: int, hidden_size: int) -> WireSpec:
        return self.codec.wire_spec(batch, num_tokens, hidden_size)

    def encode(self, layer: int, hidden: Tensor, valid: Tensor, anchor: Tensor | None = None) -> list[Tensor]:
        check_inputs(hidden, valid, anchor, self.codec.name)
        self.codec.store.setdefault(layer, []).append(hidden[valid.to(torch.bool)].to(torch.float32).clone())
        return self.codec.encode(hidden, valid, anchor)

    def decode(self, layer: int, sender: int, wire: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self.codec.decode(wire)


def exchanged_vectors(model: ReferenceModel, batches: Sequence[Inputs], world_size: int,
                      shares: tuple[float, ...] | None = None) -> list[Tensor]:
    """Per layer, the (N, d) vectors the ranks exchange for `batches` (valid tokens of every rank)."""
    recorder = RecordingCodec()
    run_distributed(model, list(batches), recorder, world_size, shares)
    return [torch.cat(recorder.store[layer]) for layer in sorted(recorder.store)]


def code_bytes_for_ratio(hidden_size: int, ratio: float) -> int:
    """Code bytes per vector that keep a token at <= 1/`ratio` of its fp32 bytes (d·4 + 1 mask byte),
    after the 2-byte scale and up to 1 byte of bit-packed mask."""
    budget = math.floor((hidden_size * FP32_BYTES_PER_TOKEN + 1) / ratio) - 2 - 1
    if budget < 1:
        raise ValueError(f"{ratio}x under fp32 leaves {budget} code bytes for {hidden_size} features")
    return budget


def calibrate_codec(model: ReferenceModel, batches: Sequence[Inputs], world_size: int, ratio: float = 8.0,
                    shares: tuple[float, ...] | None = None, layer_bytes: Sequence[int] | None = None,
                    outliers: int = DEFAULT_OUTLIERS, description: str = "") -> TransformCodec:
    """The calibrated codec for `model` over `world_size` ranks, fitted on `batches`, each layer's codes in
    `code_bytes_for_ratio(d, ratio)` bytes per vector (or `layer_bytes`, one budget per layer)."""
    vectors = exchanged_vectors(model, batches, world_size, shares)
    hidden_size = vectors[0].shape[1]
    budget: int | list[int] = list(layer_bytes) if layer_bytes is not None else code_bytes_for_ratio(hidden_size, ratio)
    codec = fit_codec(vectors, budget, outliers, description)
    log.info("calibrated %s on %d vectors per layer (%d layers, d=%d)", codec.name, vectors[0].shape[0],
             len(vectors), hidden_size)
    return codec
