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
import torch.nn.functional as F
from torch import Tensor

from edgeprism.compress.base import IdentityCodec, WireSpec, check_inputs
from edgeprism.compress.calibrated import TransformCodec, fit_codec
from edgeprism.evaluate.fidelity import run_distributed
from edgeprism.models.base import Inputs, ReferenceModel

log = logging.getLogger(__name__)

DEFAULT_OUTLIERS = 0
"""Exact components per vector (the ones the codes serve worst, 4 bytes each). With delta coding and levels
fitted per component the tails are small: on MiniLM (40 pool passages, 8x) 0 outliers gave pooled cosine
0.99982 / 0.99963 against 0.99978 / 0.99956 with 4 (passages / queries); stateless, 4 helps."""

SENSITIVITY_BATCHES = 16
"""Calibration batches the per-layer sensitivity is measured on (the first ones)."""

FP32_BYTES_PER_TOKEN = 4
"""fp32 values per feature; with the 1-byte valid mask, what one token costs under full exchange."""


@dataclass(frozen=True)
class RecordingCodec(IdentityCodec):
    """fp32 exchange (exact) that also keeps, per layer, the valid vectors each rank sent (in `store`)."""

    store: dict = field(default_factory=dict, compare=False, repr=False, hash=False)
    """layer -> list of (session number, (N, d) float32 tensor), filled by the sessions."""

    def session(self) -> _RecordingSession:
        self.store.setdefault("sessions", 0)
        self.store["sessions"] += 1  # sessions start one by one (a rank's forward pass), in order
        return _RecordingSession(self, self.store["sessions"])


@dataclass
class _RecordingSession:
    codec: RecordingCodec
    number: int

    def wire_spec(self, layer: int, batch: int, num_tokens: int, hidden_size: int) -> WireSpec:
        return self.codec.wire_spec(batch, num_tokens, hidden_size)

    def encode(self, layer: int, hidden: Tensor, valid: Tensor, anchor: Tensor | None = None) -> list[Tensor]:
        check_inputs(hidden, valid, anchor, self.codec.name)
        vectors = hidden[valid.to(torch.bool)].to(torch.float32).clone()  # (N, d)
        self.codec.store.setdefault(layer, []).append((self.number, vectors))
        return self.codec.encode(hidden, valid, anchor)

    def decode(self, layer: int, sender: int, wire: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self.codec.decode(wire)


def exchanged_vectors(model: ReferenceModel, batches: Sequence[Inputs], world_size: int,
                      shares: tuple[float, ...] | None = None) -> list[Tensor]:
    """Per layer, the (N, d) vectors the ranks exchange for `batches` (valid tokens of every rank), the same
    tokens in the same order at every layer."""
    recorder = RecordingCodec()
    run_distributed(model, list(batches), recorder, world_size, shares)
    layers = sorted(key for key in recorder.store if isinstance(key, int))
    return [torch.cat([v for _, v in sorted(recorder.store[layer], key=lambda item: item[0])]) for layer in layers]


@dataclass(frozen=True)
class NoiseCodec(IdentityCodec):
    """fp32 exchange with Gaussian noise of `relative` × each vector's RMS added at layer `layer` only (the
    sender keeps its own tokens exact, as with any codec): how much an error there moves the output."""

    layer: int = 0
    relative: float = 0.05
    seed: int = 0

    def session(self) -> _NoiseSession:
        return _NoiseSession(self, torch.Generator().manual_seed(self.seed))


@dataclass
class _NoiseSession:
    codec: NoiseCodec
    generator: torch.Generator

    def wire_spec(self, layer: int, batch: int, num_tokens: int, hidden_size: int) -> WireSpec:
        return self.codec.wire_spec(batch, num_tokens, hidden_size)

    def encode(self, layer: int, hidden: Tensor, valid: Tensor, anchor: Tensor | None = None) -> list[Tensor]:
        x = hidden.to(torch.float32)
        if layer == self.codec.layer:
            rms = x.pow(2).mean(-1, keepdim=True).sqrt()  # (B, n, 1)
            x = x + self.codec.relative * rms * torch.randn(x.shape, generator=self.generator)
        return self.codec.encode(x, valid, anchor)

    def decode(self, layer: int, sender: int, wire: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self.codec.decode(wire)


def layer_sensitivity(model: ReferenceModel, batches: Sequence[Inputs], world_size: int,
                      shares: tuple[float, ...] | None = None, relative: float = 0.05) -> list[float]:
    """Per layer, 1 - cosine of the model's pooled output when only that layer's messages carry noise of
    `relative` × their RMS (fixed seed): how much an error at that exchange costs at the output."""
    key = next((k for k in ("mean", "pooled") if k in model(batches[0])), None)
    if key is None:
        raise ValueError(f"{model.config.name}: per-layer sensitivity reads a pooled output ('mean' or 'pooled'); "
                         f"give layer_bytes or per_layer_bits=False")
    with torch.no_grad():
        reference = [model(b)[key] for b in batches]
    out = []
    for layer in range(model.config.num_layers):
        noisy = NoiseCodec(layer=layer, relative=relative)
        outputs, _ = run_distributed(model, list(batches), noisy, world_size, shares)
        cosine = torch.cat([F.cosine_similarity(r, o[key], dim=-1) for r, o in zip(reference, outputs)])
        out.append(max(float(1 - cosine.mean()), 1e-12))
    return out


def layer_budgets(sensitivity: Sequence[float], mean_bytes: int, hidden_size: int) -> list[int]:
    """Code bytes per layer averaging at most `mean_bytes`: reverse water-filling across layers. With error
    a_l · 2^(-2 R_l / d) at R_l bits per vector, the total error is least when R_l = mean + (d / 2) log2(a_l /
    geometric mean of a): d / 16 bytes more per doubling of a layer's sensitivity; kept in [mean / 2, 2 · mean]."""
    logs = [math.log2(a) for a in sensitivity]
    centre = sum(logs) / len(logs)
    raw = [min(2 * mean_bytes, max(mean_bytes // 2, round(mean_bytes + hidden_size / 16 * (v - centre)))) for v in logs]
    while sum(raw) > mean_bytes * len(raw):  # rounding and clipping: take back from the largest
        raw[raw.index(max(raw))] -= 1
    return raw


def code_bytes_for_ratio(hidden_size: int, ratio: float) -> int:
    """Code bytes per vector that keep a token at <= 1/`ratio` of its fp32 bytes (d·4 + 1 mask byte),
    after the 2-byte scale and up to 1 byte of bit-packed mask."""
    budget = math.floor((hidden_size * FP32_BYTES_PER_TOKEN + 1) / ratio) - 2 - 1
    if budget < 1:
        raise ValueError(f"{ratio}x under fp32 leaves {budget} code bytes for {hidden_size} features")
    return budget


def calibrate_codec(model: ReferenceModel, batches: Sequence[Inputs], world_size: int, ratio: float = 8.0,
                    shares: tuple[float, ...] | None = None, layer_bytes: Sequence[int] | None = None,
                    outliers: int = DEFAULT_OUTLIERS, delta: bool = True, per_layer_bits: bool = True,
                    description: str = "") -> TransformCodec:
    """The calibrated codec for `model` over `world_size` ranks, fitted on `batches`, each layer's codes in
    `code_bytes_for_ratio(d, ratio)` bytes per vector (or `layer_bytes`, one budget per layer)."""
    vectors = exchanged_vectors(model, batches, world_size, shares)
    hidden_size = vectors[0].shape[1]
    budget: int | list[int] = code_bytes_for_ratio(hidden_size, ratio)
    if layer_bytes is not None:
        budget = list(layer_bytes)
    elif per_layer_bits:
        sensitivity = layer_sensitivity(model, batches[:SENSITIVITY_BATCHES], world_size, shares)
        mean_bytes = code_bytes_for_ratio(hidden_size, ratio)
        # delta: the key frame's error is corrected by the next layer's residual, not carried on, so the rule
        # spreads bytes over the residual layers only and the key frame keeps the mean
        budget = ([mean_bytes] + layer_budgets(sensitivity[1:], mean_bytes, hidden_size) if delta
                  else layer_budgets(sensitivity, mean_bytes, hidden_size))
        log.info("layer sensitivity %s -> code bytes per layer %s", [f"{a:.2e}" for a in sensitivity], budget)
    codec = fit_codec(vectors, budget, outliers, delta, description)
    log.info("calibrated %s on %d vectors per layer (%d layers, d=%d)", codec.name, vectors[0].shape[0],
             len(vectors), hidden_size)
    return codec
