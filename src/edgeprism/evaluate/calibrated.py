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
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from edgeprism.compress.base import IdentityCodec, WireSpec, check_inputs
from edgeprism.compress.calibrated import TransformCodec, fit_codec
from edgeprism.evaluate.fidelity import run_distributed
from edgeprism.models.base import Inputs, KVExchangeBlock, ReferenceModel, SplitAttention
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
"""Calibration batches the per-layer sensitivity is measured on (the first ones)."""

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


def attention_metric(model: ReferenceModel, layer: int, samples: Tensor, average: str = DEFAULT_AVERAGE) -> Tensor:
    """The error metric (d, d) of layer `layer`'s exchanged vectors by what their error does to the attention
    output of a query reading them, per head h (attention weight p on the received token, the same for both
    terms and dropped; independent heads, cross terms dropped):

        value error:  p · δv_h W_o,h                       -> J_v,h^T W_o,h W_o,h^T J_v,h
        key error:    p · scale · (q_h · δk_h) (v_h - o_h) W_o,h
                      -> scale^2 E|(v_h - mean v_h) W_o,h|^2 J_k,h^T E[q_h q_h^T] J_k,h

    with J the Jacobians of the received K/V (as `kv_metric`), q_h the queries of the same calibration vectors
    (a rank's own tokens come from the same distribution) and W_o,h head h's rows of the output projection.
    A block whose attention does not declare `SplitAttention` (rotary: keys sent as they are) gets `kv_metric`."""
    block = model.blocks[layer]
    attn = getattr(block, "attn", None)
    if isinstance(block, KVExchangeBlock) or not isinstance(attn, SplitAttention):
        return kv_metric(model, layer, samples, average)
    probe = samples[:: max(1, samples.shape[0] // METRIC_VECTORS)][:METRIC_VECTORS].to(torch.float32)  # statistics
    width = samples.shape[1]

    def kv_heads(x: Tensor) -> Tensor:  # (d,) one received vector -> (2, heads, head_dim)
        x = x.view(1, 1, -1)
        return torch.stack(attn.project_kv(block.kv_input(x) if average == "residual" else x))[:, 0, :, 0]

    with torch.no_grad():
        x_in = (block.kv_input(probe.unsqueeze(0)) if average == "residual" else probe.unsqueeze(0))  # (1, N, d)
        q = attn.project_q(x_in)[0].to(torch.float64)  # (heads, N, hd)
        _, v = attn.project_kv(x_in)  # (1, heads, N, hd)
        heads, head_dim = q.shape[0], q.shape[2]
        eye = torch.eye(head_dim).expand(1, 1, head_dim, head_dim)
        zero = attn.project_out(torch.zeros(1, heads, head_dim, head_dim))[0]  # (hd, d): the bias alone
        out = torch.stack([attn.project_out(torch.cat([torch.zeros(1, h, head_dim, head_dim), eye,
                                                       torch.zeros(1, heads - h - 1, head_dim, head_dim)], 1))[0]
                           - zero for h in range(heads)]).to(torch.float64)  # (heads, hd, d): W_o,h
        spread = torch.einsum("hna,hab->hnb", (v[0] - v[0].mean(1, keepdim=True)).to(torch.float64), out)
        key_weight = attn.scale ** 2 * spread.pow(2).sum(-1).mean(-1)  # (heads,)
        queries = torch.einsum("hna,hnb->hab", q, q) / q.shape[1]  # (heads, hd, hd)
        # per head, the (hd, hd) form each error meets: the output projection's for values, the queries' for keys
        forms = torch.stack([out @ out.transpose(1, 2), key_weight[:, None, None] * queries])  # (2, heads, hd, hd)
        metric = torch.zeros(width, width, dtype=torch.float64)
        jacobian_probe = probe[:: max(1, probe.shape[0] // JACOBIAN_VECTORS)][:JACOBIAN_VECTORS]
        for chunk in jacobian_probe.split(16):
            jacobian = torch.func.vmap(torch.func.jacrev(kv_heads))(chunk).to(torch.float64)  # (n, 2, H, hd, d)
            weighted = torch.matmul(forms.unsqueeze(0), jacobian)  # (n, 2, H, hd, d)
            metric += torch.einsum("nkhad,nkhae->de", weighted, jacobian)
    metric /= jacobian_probe.shape[0]
    return metric + RIDGE * float(metric.diagonal().mean()) * torch.eye(width, dtype=torch.float64)


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
                    error: Literal["attention", "kv", "hidden"] = "kv",
                    description: str = "") -> TransformCodec:
    """The calibrated codec for `model` over `world_size` ranks, fitted on `batches`, each layer's codes in
    `code_bytes_for_ratio(d, ratio)` bytes per vector (or `layer_bytes`, one budget per layer). `error`: what
    each layer's fit minimises: "kv", the error of the keys and values the receiver computes (`kv_metric`),
    or "hidden", the squared error of the exchanged vector itself."""
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
    metric_of = {"attention": attention_metric, "kv": kv_metric}.get(error)
    metrics = [metric_of(model, i, x) for i, x in enumerate(vectors)] if metric_of is not None else None
    codec = fit_codec(vectors, budget, outliers, delta, description, metrics)
    log.info("calibrated %s on %d vectors per layer (%d layers, d=%d)", codec.name, vectors[0].shape[0],
             len(vectors), hidden_size)
    return codec
