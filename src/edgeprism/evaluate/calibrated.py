"""Fit a calibrated codec (`compress.calibrated`, "tc:<digest>") on the vectors a model really exchanges.

The calibration vectors are what each rank's layer message carries on the real distributed path
(PositionWise over the loopback group, full fp32 exchange): a recording codec stores every valid
token's vector per layer. `calibrate_codec` fits one transform per layer on them. Deterministic: the
same model, batches, world size, budget and thread count give the same codec (same digest, same bytes);
another thread count can change the recorded vectors' last bits, and so the digest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from edgeprism.compress.base import IdentityCodec, WireSpec, check_inputs
from edgeprism.compress.calibrated import TransformCodec, TransformSession, fit_codec
from edgeprism.evaluate.fidelity import run_distributed
from edgeprism.models.base import Inputs, KVExchangeBlock, ReferenceModel
from edgeprism.partition.transform import DEFAULT_AVERAGE

log = logging.getLogger(__name__)

DEFAULT_OUTLIERS = 0
"""Exact components per vector (the ones the codes serve worst, 4 bytes each). With delta coding and levels
fitted per component the tails are small: on MiniLM (40 pool passages, 8x) 0 outliers gave pooled cosine
0.99982 / 0.99963 against 0.99978 / 0.99956 with 4 (passages / queries); stateless, 4 helps."""

METRIC_VECTORS = 256
"""At most this many calibration vectors (evenly strided) per layer estimate an error metric's statistics."""
JACOBIAN_VECTORS = 32
"""Of those, this many average the Jacobian of the received K/V (exact with one where the map is affine:
post-LN blocks, the default "normed" exchange)."""

RIDGE = 1e-6
"""Added to an error metric, times its mean eigenvalue: keeps it positive definite (directions K/V do not read)."""

SENSITIVITY_BATCHES = 16
"""Calibration batches each layer's cost at the output (`layer_harm`) is measured on (the first ones)."""

FP32_BYTES_PER_TOKEN = 4
"""fp32 values per feature; with the 1-byte valid mask, what one token costs under full exchange."""


@dataclass(frozen=True)
class RecordingCodec(IdentityCodec):
    """fp32 exchange (exact) that also keeps the valid vectors each rank sent, per layer (`sessions`)."""

    sessions: list = field(default_factory=list, compare=False, repr=False, hash=False)
    """Every session, in the order they were made (the ranks of one forward pass race for it)."""

    def session(self) -> _RecordingSession:
        self.sessions.append(_RecordingSession(self, len(self.sessions)))
        return self.sessions[-1]


@dataclass
class _RecordingSession:
    codec: RecordingCodec
    number: int
    vectors: dict[int, Tensor] = field(default_factory=dict)
    """layer -> (N, d) float32 valid vectors this rank sent."""
    senders: set[int] = field(default_factory=set)
    """Ranks this one received from: all but itself (encoders) or those before it (decoders)."""

    @property
    def rank(self) -> int:
        """The least rank this session never received from: its own, for full and causal exchanges alike."""
        return min(set(range(len(self.senders) + 1)) - self.senders)

    def wire_spec(self, layer: int, batch: int, num_tokens: int, hidden_size: int) -> WireSpec:
        return self.codec.wire_spec(batch, num_tokens, hidden_size)

    def encode(self, layer: int, hidden: Tensor, valid: Tensor, anchor: Tensor | None = None) -> list[Tensor]:
        check_inputs(hidden, valid, anchor, self.codec.name)
        self.vectors[layer] = hidden[valid.to(torch.bool)].to(torch.float32).clone()  # (N, d)
        return self.codec.encode(hidden, valid, anchor)

    def decode(self, layer: int, sender: int, wire: list[Tensor]) -> tuple[Tensor, Tensor]:
        self.senders.add(sender)
        return self.codec.decode(wire)


def exchanged_vectors(model: ReferenceModel, batches: Sequence[Inputs], world_size: int,
                      shares: tuple[float, ...] | None = None) -> list[Tensor]:
    """Per layer, the (N, d) vectors the ranks exchange for `batches` (valid tokens of every rank), the same
    tokens in the same order at every layer and in every run: batch by batch, rank by rank, and a rank's
    sessions (one per micro-batch) in the order it made them. The ranks' threads make their sessions in
    any order, so arrival order would make the codec's digest a race."""
    per_layer: dict[int, list[Tensor]] = {}
    for batch in batches:
        recorder = RecordingCodec()
        run_distributed(model, [batch], recorder, world_size, shares)
        for session in sorted((s for s in recorder.sessions if s.vectors), key=lambda s: (s.rank, s.number)):
            for layer, vectors in session.vectors.items():
                per_layer.setdefault(layer, []).append(vectors)
    return [torch.cat(per_layer[layer]) for layer in sorted(per_layer)]


@dataclass(frozen=True)
class OneLayerCodec(IdentityCodec):
    """fp32 exchange, except at layer `layer`, where receivers read what `codec` decodes (its session runs at
    every layer, so a delta codec's reconstructions stay in step): how much that codec's error there alone
    moves the output. A measuring device of the calibration (loopback only): it sends both."""

    codec: TransformCodec | None = None
    layer: int = 0

    def session(self) -> _OneLayerSession:
        assert self.codec is not None
        return _OneLayerSession(self, self.codec.session())


@dataclass
class _OneLayerSession:
    outer: OneLayerCodec
    inner: TransformSession

    def wire_spec(self, layer: int, batch: int, num_tokens: int, hidden_size: int) -> WireSpec:
        return [*self.outer.wire_spec(batch, num_tokens, hidden_size),
                *self.inner.wire_spec(layer, batch, num_tokens, hidden_size)]

    def encode(self, layer: int, hidden: Tensor, valid: Tensor, anchor: Tensor | None = None) -> list[Tensor]:
        return [*self.outer.encode(hidden, valid, anchor), *self.inner.encode(layer, hidden, valid, anchor)]

    def decode(self, layer: int, sender: int, wire: list[Tensor]) -> tuple[Tensor, Tensor]:
        split = len(self.outer.wire_spec(1, 1, 1))
        exact, coded = self.outer.decode(wire[:split]), self.inner.decode(layer, sender, wire[split:])
        return coded if layer == self.outer.layer else exact


def layer_harm(model: ReferenceModel, batches: Sequence[Inputs], world_size: int, codec: TransformCodec,
               shares: tuple[float, ...] | None = None) -> list[float]:
    """Per layer, 1 - cosine of the model's pooled output when only that layer's messages go through `codec`:
    what that codec's error at that exchange costs at the output (its distortion there times the output's
    sensitivity to it), measured on the calibration batches."""
    key = next((k for k in ("mean", "pooled") if k in model(batches[0])), None)
    if key is None:
        raise ValueError(f"{model.config.name}: per-layer bytes read a pooled output ('mean' or 'pooled'); "
                         f"give layer_bytes or per_layer_bits=False")
    with torch.no_grad():
        reference = [model(b)[key] for b in batches]
    out = []
    for layer in range(len(codec.layers)):
        outputs, _ = run_distributed(model, list(batches), OneLayerCodec(codec=codec, layer=layer), world_size,
                                     shares)
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


def kv_metric(model: ReferenceModel, layer: int, samples: Tensor, average: str = DEFAULT_AVERAGE) -> Tensor:
    """The error metric (d, d) of layer `layer`'s exchanged vectors: E[J^T J] over (at most `JACOBIAN_VECTORS`,
    evenly strided) calibration vectors `samples` (N, d), J the Jacobian of the keys and values the receiver
    computes from a received vector (as `partition.attend.block_with_remote` does: `kv_from_wire` for a
    `KVExchangeBlock`, else `project_kv` of the vector, through `kv_input` first when the residual is sent).
    e^T M e is then the squared error an error e of the vector puts into the K/V the attention consumes
    (exactly, where that map is affine: a post-LN block, the "normed" exchange). A ridge of 1e-6 of the
    mean eigenvalue keeps it positive definite (directions K/V do not read)."""
    block = model.blocks[layer]

    def keys_values(x: Tensor) -> Tensor:  # (d,) one received vector -> (2 · heads · head_dim,)
        x = x.view(1, 1, -1)
        if isinstance(block, KVExchangeBlock):
            k, v = block.kv_from_wire(x)
        else:
            k, v = block.attn.project_kv(block.kv_input(x) if average == "residual" else x)
        return torch.cat([k.flatten(), v.flatten()])

    probe = samples[:: max(1, samples.shape[0] // JACOBIAN_VECTORS)][:JACOBIAN_VECTORS].to(torch.float32)
    metric = torch.zeros(samples.shape[1], samples.shape[1], dtype=torch.float64)
    with torch.no_grad():
        for chunk in probe.split(16):
            jacobian = torch.func.vmap(torch.func.jacrev(keys_values))(chunk).to(torch.float64)  # (n, 2·H·hd, d)
            metric += torch.einsum("nod,noe->de", jacobian, jacobian)
    metric /= probe.shape[0]
    return metric + RIDGE * float(metric.diagonal().mean()) * torch.eye(samples.shape[1], dtype=torch.float64)


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
                    error: Literal["kv", "hidden"] = "kv", description: str = "") -> TransformCodec:
    """The calibrated codec for `model` over `world_size` ranks, fitted on `batches`, each layer's codes in
    `code_bytes_for_ratio(d, ratio)` bytes per vector on average (or `layer_bytes`, one budget per layer; or
    the same for every layer with `per_layer_bits=False`). `error`: what each layer's fit minimises: "kv",
    the error of the keys and values the receiver computes (`kv_metric`), or "hidden", the squared error of
    the exchanged vector itself."""
    vectors = exchanged_vectors(model, batches, world_size, shares)
    hidden_size = vectors[0].shape[1]
    metrics = [kv_metric(model, i, x) for i, x in enumerate(vectors)] if error == "kv" else None
    budget: int | list[int] = code_bytes_for_ratio(hidden_size, ratio)
    if layer_bytes is not None:
        budget = list(layer_bytes)
    elif per_layer_bits:
        # reverse water-filling on what each layer's error costs at the output with the same bytes everywhere
        # (`layer_harm`): a layer whose error moves the output more gets more bytes, one that moves it less fewer
        mean_bytes = code_bytes_for_ratio(hidden_size, ratio)
        uniform = fit_codec(vectors, mean_bytes, outliers, delta, metrics=metrics)
        harm = layer_harm(model, batches[:SENSITIVITY_BATCHES], world_size, uniform, shares)
        budget = layer_budgets(harm, mean_bytes, hidden_size)
        log.info("output error per layer at %d bytes %s -> code bytes per layer %s", mean_bytes,
                 [f"{a:.2e}" for a in harm], budget)
    codec = fit_codec(vectors, budget, outliers, delta, description, metrics)
    log.info("calibrated %s on %d vectors per layer (%d layers, d=%d)", codec.name, vectors[0].shape[0],
             len(vectors), hidden_size)
    return codec
