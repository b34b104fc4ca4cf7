"""Measured fidelity of each codec: the distributed model against the single-device model, on real data.

An `EvalSet` is a model, its request batches and a scoring rule. `evaluate` runs the position-wise
model (through the in-process transport, `comm.loopback`: the same `PositionWise` code as a real
process group) for each codec and returns one row per (codec, metric), with the bytes it exchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from edgeprism.comm.loopback import LoopbackGroup
from edgeprism.compress.base import Codec
from edgeprism.compress.registry import get_codec
from edgeprism.evaluate.metrics import DECODER_BUDGET_METRIC, LABEL_SHIFT_METRIC
from edgeprism.models.base import Inputs, ReferenceModel
from edgeprism.partition.ranges import equal_shares, split_tokens
from edgeprism.partition.transform import DEFAULT_AVERAGE, DEFAULT_SIZE_AWARE, PositionWise

log = logging.getLogger(__name__)

Outputs = dict[str, torch.Tensor]


NEAR_TIE_MARGIN = 0.01
"""Top-2 softmax margin of the single-device answer below which an item counts as near-tied."""


@dataclass(frozen=True)
class MetricValue:
    metric: str
    value: float
    reference_value: float
    higher_is_better: bool = True
    near_ties: int | None = None
    """For a top-1 metric: items whose single-device top-2 margin is below `NEAR_TIE_MARGIN` (None: not one)."""
    items: int | None = None
    """For a top-1 metric: the items it was counted over."""

    @property
    def loss(self) -> float:
        """Relative fidelity loss in [0, ...): how much worse than the reference, as a fraction of it."""
        if self.reference_value == 0:
            return 0.0
        worse = (self.reference_value - self.value) if self.higher_is_better else (self.value - self.reference_value)
        return max(0.0, worse / abs(self.reference_value))


@dataclass(frozen=True)
class EvalSet:
    name: str
    model: ReferenceModel
    batches: list[Inputs]
    score: Callable[[list[Outputs], list[Outputs]], list[MetricValue]]
    """(reference outputs per batch, distributed outputs per batch) → metrics."""
    gather_hidden: bool = False
    description: str = ""

    @property
    def num_requests(self) -> int:
        return sum(next(iter(b.values())).shape[0] for b in self.batches)

    def num_tokens(self) -> float:
        """Mean tokens per request row (padded length of its batch)."""
        counts = [self.model.validate_input(b) for b in self.batches]
        rows = [next(iter(b.values())).shape[0] for b in self.batches]
        return sum(c * r for c, r in zip(counts, rows)) / max(1, sum(rows))


@dataclass(frozen=True)
class FidelityRow:
    eval_set: str
    model: str
    codec: str
    cr: int
    world_size: int
    size_aware: bool
    average: str
    metric: str
    value: float
    reference_value: float
    loss: float
    bytes_per_request: float
    traffic_vs_fp32: float
    """Measured layer bytes over what full fp32 exchange sends for the same requests."""
    num_requests: int
    near_ties: int | None = None
    """Of a top-1 metric's `items`, those near-tied on one device (`MetricValue.near_ties`)."""
    items: int | None = None

    def to_dict(self) -> dict:
        """The `edgeprism eval --out` row (`near_ties`/`items` only where the metric counts them)."""
        row = asdict(self)
        for key in ("near_ties", "items"):
            if row[key] is None:
                del row[key]
        return row


def codec_cr(codec: Codec) -> int:
    """Tokens per segment of a Segment Means codec (1 for codecs that send every token)."""
    return int(getattr(codec, "ratio", 1))


def run_distributed(model: ReferenceModel, batches: Iterable[Inputs], codec: Codec, world_size: int,
                    shares: tuple[float, ...] | None = None, size_aware: bool = DEFAULT_SIZE_AWARE,
                    gather_hidden: bool = False, average: str = DEFAULT_AVERAGE) -> tuple[list[Outputs], int]:
    """Root outputs per batch, and the layer bytes all ranks sent in total."""
    group = LoopbackGroup(world_size)
    outputs, nbytes = [], 0
    clamped = []  # the smallest partition of each batch whose partitions were shorter than the CR: said once below
    for batch in batches:
        def rank_fn(ctx, exchanger, batch=batch):
            engine = PositionWise(model, ctx, codec, size_aware=size_aware, exchanger=exchanger, average=average,
                                  warn_clamped_ratio=False)
            out = engine.forward(batch if ctx.is_root else None, shares, gather_hidden=gather_hidden)
            return out, exchanger.stats.per_kind_nbytes.get("layer", 0)

        results = group.run(rank_fn)
        outputs.append(results[0][0])
        nbytes += sum(r[1] for r in results)
        smallest = min(r.num_tokens for r in split_tokens(model.validate_input(batch),
                                                          shares or equal_shares(world_size)))
        if codec_cr(codec) > smallest:
            clamped.append(smallest)
    if clamped:
        log.info("%s: CR %d exceeds the smallest partition in %d of the batches (down to %d tokens): such a rank "
                 "sends one mean per row there", codec.name, codec_cr(codec), len(clamped), min(clamped))
    return outputs, nbytes


def fp32_exchange_bytes(model: ReferenceModel, batches: Iterable[Inputs], world_size: int,
                        shares: tuple[float, ...] | None = None) -> int:
    """Layer bytes full fp32 exchange would send for `batches`, counted as the exchanger counts them
    (all-gather: every rank sends the largest message; causal: each message once per later rank)."""
    from edgeprism.compress.base import IdentityCodec

    codec, d, total = IdentityCodec(), model.config.exchange_width, 0  # features per token on the wire
    for batch in batches:
        rows = next(iter(batch.values())).shape[0]
        ranges = split_tokens(model.validate_input(batch), shares or equal_shares(world_size))
        sizes = [codec.nbytes(rows, r.num_tokens, d) for r in ranges]
        if model.causal:
            per_layer = sum(size * (world_size - 1 - p) for p, size in enumerate(sizes))
        else:
            per_layer = max(sizes) * world_size
        total += per_layer * model.config.num_layers
    return total


def evaluate(eval_set: EvalSet, codecs: list[str], world_size: int, shares: tuple[float, ...] | None = None,
             size_aware: bool = DEFAULT_SIZE_AWARE, progress: Callable[[str], None] | None = None,
             average: str = DEFAULT_AVERAGE) -> list[FidelityRow]:
    model = eval_set.model
    with torch.no_grad():
        reference = [model(batch) for batch in eval_set.batches]
    rows: list[FidelityRow] = []
    full_bytes = fp32_exchange_bytes(model, eval_set.batches, world_size, shares)
    for i, name in enumerate(codecs):
        codec = get_codec(name)
        outputs, nbytes = run_distributed(model, eval_set.batches, codec, world_size, shares, size_aware,
                                          eval_set.gather_hidden, average)
        for metric in eval_set.score(reference, outputs):
            rows.append(
                FidelityRow(
                    eval_set.name,
                    model.config.name,
                    str(codec),
                    codec_cr(codec),
                    world_size,
                    size_aware,
                    average,
                    metric.metric,
                    metric.value,
                    metric.reference_value,
                    metric.loss,
                    nbytes / eval_set.num_requests,
                    nbytes / full_bytes,
                    eval_set.num_requests,
                    metric.near_ties,
                    metric.items,
                )
            )
        if progress:
            summary = ", ".join(f"{r.metric}={r.value:.4g}" for r in rows if r.codec == str(codec))
            progress(f"[{i + 1}/{len(codecs)}] {eval_set.name} {codec}: {summary}")
    return rows


# --- scoring rules ---

def embedding_score(head=None) -> Callable[[list[Outputs], list[Outputs]], list[MetricValue]]:
    """Sentence embeddings (mean over valid tokens, L2-normalised): cosine to the reference, and top-1
    agreement of an intent head applied to both when one is given."""

    def score(reference: list[Outputs], candidate: list[Outputs]) -> list[MetricValue]:
        ref = F.normalize(torch.cat([r["mean"] for r in reference]), dim=-1)
        got = F.normalize(torch.cat([c["mean"] for c in candidate]), dim=-1)
        metrics = [MetricValue("embedding_cosine", float((ref * got).sum(-1).mean()), 1.0)]
        if head is not None:
            ref_logits, got_logits = head.logits(ref), head.logits(got)
            agree = (ref_logits.argmax(-1) == got_logits.argmax(-1)).float().mean()
            metrics += [MetricValue("intent_agreement", float(agree), 1.0), label_shift(ref_logits, got_logits)]
        return metrics

    return score


def probe_score(
    probe: torch.nn.Linear, labels: torch.Tensor
) -> Callable[[list[Outputs], list[Outputs]], list[MetricValue]]:
    """A linear probe on pooled ([CLS]) features: accuracy against labels, and top-1 agreement."""

    def score(reference: list[Outputs], candidate: list[Outputs]) -> list[MetricValue]:
        with torch.no_grad():
            ref_logits = probe(torch.cat([r["pooled"] for r in reference]))
            got_logits = probe(torch.cat([c["pooled"] for c in candidate]))
        ref_pred, got_pred = ref_logits.argmax(-1), got_logits.argmax(-1)
        return [MetricValue("probe_accuracy", float((got_pred == labels).float().mean()),
                            float((ref_pred == labels).float().mean())),
                MetricValue("top1_agreement", float((got_pred == ref_pred).float().mean()), 1.0),
                label_shift(ref_logits, got_logits)]

    return score


def next_token_logits(model: ReferenceModel, outputs: Outputs, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V) at every real position that has a next token, their targets (N,))."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    keep = (mask[:, 1:] * mask[:, :-1]).bool()  # (B, T-1): position t predicts token t+1, both real
    logits = model.logits(outputs["hidden"][:, :-1])  # (B, T-1, V)
    return logits[keep].float(), ids[:, 1:][keep]


def label_shift(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> MetricValue:
    """`evaluate.metrics.LABEL_SHIFT_METRIC` of (N, classes) logits: the largest change in the difference of any
    two labels' probabilities (0 for no item)."""
    delta = candidate_logits.float().softmax(-1) - reference_logits.float().softmax(-1)
    shift = float((delta.max(-1).values - delta.min(-1).values).max()) if delta.numel() else 0.0
    return MetricValue(LABEL_SHIFT_METRIC, shift, 0.0, higher_is_better=False, items=int(delta.shape[0]))


def top2_margins(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 softmax probability per row of (N, classes) logits."""
    top = logits.softmax(-1).topk(min(2, logits.shape[-1]), dim=-1).values
    return top[:, 0] - top[:, 1] if top.shape[1] > 1 else torch.ones(top.shape[0])


def next_token_score(model: ReferenceModel,
                     batches: list[Inputs]) -> Callable[[list[Outputs], list[Outputs]], list[MetricValue]]:
    """A decoder's fidelity over every real position of `batches` (outputs gathered with `gather_hidden`):
    `next_token_agreement` (the greedy token equals one device's; with its near ties), the budget metric
    (`evaluate.metrics`), and `perplexity` of the text's next tokens, reported beside it."""

    @torch.no_grad()
    def answers(outputs: list[Outputs]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [next_token_logits(model, o, b) for o, b in zip(outputs, batches)]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])  # (N, V), (N,)

    def score(reference: list[Outputs], candidate: list[Outputs]) -> list[MetricValue]:
        (ref_logits, targets), (got_logits, _) = answers(reference), answers(candidate)
        if targets.numel() == 0:
            raise ValueError(f"{len(batches)} batches have no position with a real next token (each text needs "
                             f"2 tokens or more)")
        agree = float((ref_logits.argmax(-1) == got_logits.argmax(-1)).float().mean())
        ties = int((top2_margins(ref_logits) < NEAR_TIE_MARGIN).sum())
        return [MetricValue(DECODER_BUDGET_METRIC, agree, 1.0, near_ties=ties, items=int(targets.numel())),
                MetricValue("perplexity", math.exp(float(F.cross_entropy(got_logits, targets))),
                            math.exp(float(F.cross_entropy(ref_logits, targets))), higher_is_better=False),
                label_shift(ref_logits, got_logits)]

    return score


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 300,
                     weight_decay: float = 1e-4, seed: int = 0) -> torch.nn.Linear:
    """Multinomial logistic regression on frozen features (full-batch L-BFGS, deterministic)."""
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    probe = torch.nn.Linear(features.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    x = (features - mean) / std

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), labels) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    # Fold the standardisation into the layer so it applies to raw features.
    with torch.no_grad():
        folded = torch.nn.Linear(features.shape[1], num_classes)
        folded.weight.copy_(probe.weight / std)
        folded.bias.copy_(probe.bias - (probe.weight * mean / std).sum(1))
    return folded
