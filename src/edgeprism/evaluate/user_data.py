"""Fidelity on the user's own data: `edgeprism eval --model DIR --data FILE.jsonl`.

Each line of the file is one item, `{"text": "...", "label": ...}` or `{"image": "path", "label": ...}`
(the label optional; an image path relative to the file's folder). Items are encoded with the
checkpoint's own tokenizer or preprocessor (`inputs.load_io`), and every codec runs the real
position-wise path (`evaluate.fidelity.evaluate`) against the single device, scored by:

- encoders: `pooled_cosine` (the checkpoint's own pooling, as the API serves embeddings), and with a
  classifier in the folder `top1_agreement` (with `near_ties`: items whose single-device top-2 softmax
  margin is below `NEAR_TIE_MARGIN`, where a disagreement says little) and, with labels, `label_accuracy`;
- decoders: `next_token_agreement` over every real position (with `near_ties` likewise) and `perplexity`.

The rows are `edgeprism eval --out` rows, so `edgeprism profile --fidelity FILE` imports them and the
planner's fidelity budget applies to this model (profile/fidelity.py). `--calibration-fraction` first
picks each low-bit codec's outlier/rotation settings on a calibration split (`evaluate/settings.py`)
and reports on the rest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from edgeprism.evaluate.fidelity import (
    NEAR_TIE_MARGIN,
    EvalSet,
    MetricValue,
    Outputs,
    label_shift,
    next_token_logits,
    next_token_score,
    top2_margins,
)
from edgeprism.evaluate.metrics import DECODER_BUDGET_METRIC
from edgeprism.inputs.io import ModelIO
from edgeprism.models.base import Inputs, ReferenceModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataItem:
    """One line of the user's file: a text or an image path, and an optional label."""

    text: str | None = None
    image: Path | None = None
    label: str | int | None = None


def read_items(path: str | Path, modality: str) -> list[DataItem]:
    """The items of a JSON-lines file; ValueError naming the line for anything malformed or of the wrong kind."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--data {path}: cannot read it ({err})") from None
    want = "image" if modality == "image" else "text"
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON object ({err})") from None
        if not isinstance(row, dict) or ("text" in row) == ("image" in row):
            raise ValueError(f'{path}:{number}: each line is {{"text": ...}} or {{"image": path}} with an optional '
                             f'"label", got {line[:80]!r}')
        if want not in row:
            raise ValueError(f"{path}:{number}: the model takes {want}s, this line has {sorted(row)}")
        label = row.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
            raise ValueError(f"{path}:{number}: label {label!r} must be a class name or index")
        if want == "text":
            if not isinstance(row["text"], str) or not row["text"].strip():
                raise ValueError(f"{path}:{number}: text must be a non-empty string")
            items.append(DataItem(text=row["text"], label=label))
        else:
            image = path.parent / str(row["image"])
            if not image.is_file():
                raise ValueError(f"{path}:{number}: image {image} does not exist (paths are relative to {path.parent})")
            items.append(DataItem(image=image, label=label))
    if not items:
        raise ValueError(f"--data {path} has no items")
    return items


def split_items(items: Sequence[DataItem], calibration_fraction: float | None,
                seed: int = 0) -> tuple[list[DataItem], list[DataItem]]:
    """(calibration items, report items): a seeded shuffle, the first `fraction` of it for calibration."""
    if not calibration_fraction:
        return [], list(items)
    if not 0 < calibration_fraction < 1:
        raise ValueError(f"--calibration-fraction {calibration_fraction} must be in (0, 1), e.g. 0.3")
    count = round(calibration_fraction * len(items))
    if not 1 <= count < len(items):
        raise ValueError(f"--calibration-fraction {calibration_fraction} of {len(items)} items leaves "
                         f"{count} for calibration and {len(items) - count} to report on; each needs at least 1")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order[:count]], [items[i] for i in order[count:]]


def encode_batches(io: ModelIO, items: Sequence[DataItem], batch_size: int) -> tuple[list[Inputs], list[int]]:
    """(model inputs in batches of `batch_size`, the item index behind each row in row order). Texts are
    sorted by length, so rows waste little padding, and too-long ones are cut to the model's positions;
    a decoder gets one text per batch (all its positions real)."""
    if items[0].image is not None:
        blobs = [item.image.read_bytes() for item in items if item.image is not None]
        return [io.encode_images(blobs[i:i + batch_size]) for i in range(0, len(blobs), batch_size)], \
            list(range(len(items)))
    texts = [item.text or "" for item in items]
    if io.task == "text-decoder":
        batch_size = 1
    lengths = io.count_tokens(texts)
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    return [io.encode_texts([texts[i] for i in order[start:start + batch_size]], truncate=True)
            for start in range(0, len(order), batch_size)], order


def label_indices(io: ModelIO, items: Sequence[DataItem], order: list[int]) -> torch.Tensor | None:
    """Class index of each item's label in row `order`, or None when the items carry no labels."""
    labels = [items[i].label for i in order]
    if all(label is None for label in labels):
        return None
    if io.classifier is None:
        log.warning("the data carry labels but %s has no classifier in its folder: labels are not scored",
                    io.model_name)
        return None
    if any(label is None for label in labels):
        raise ValueError("some items have a label and some do not; label all of them or none")
    names = {name: i for i, name in enumerate(io.classifier.labels)}
    out = []
    for label in labels:
        if isinstance(label, int):
            if not 0 <= label < len(names):
                raise ValueError(f"label {label} is outside the classifier's {len(names)} classes")
            out.append(label)
        elif label in names:
            out.append(names[label])
        else:
            raise ValueError(f"label {label!r} is not one of the classifier's labels ({', '.join(list(names)[:8])}...)")
    return torch.tensor(out)


def _class_logits(io: ModelIO, outputs: Outputs, inputs: Inputs) -> torch.Tensor:
    assert io.classifier is not None
    features = io.class_features(outputs, inputs)
    return F.linear(features.float(), io.classifier.weight, io.classifier.bias)  # (B, classes)


def user_eval_set(name: str, model: ReferenceModel, io: ModelIO, batches: list[Inputs],
                  labels: torch.Tensor | None) -> tuple[EvalSet, dict[str, int]]:
    """The evaluation set of the user's batches, and `near_ties`/`items` of its top-1 metric (they depend
    on the single-device answers alone, so they are the same for every codec)."""
    decoder = io.task == "text-decoder"
    decoder_score = next_token_score(model, batches)

    def answers(outputs: list[Outputs]) -> list[torch.Tensor]:
        with torch.no_grad():
            if decoder:
                return [next_token_logits(model, o, b)[0] for o, b in zip(outputs, batches)]
            return [_class_logits(io, o, b) for o, b in zip(outputs, batches)]

    def score(reference: list[Outputs], candidate: list[Outputs]) -> list[MetricValue]:
        if decoder:
            return decoder_score(reference, candidate)
        metrics = []
        ref_pooled = torch.cat([io.embeddings(o, b) for o, b in zip(reference, batches)])
        got_pooled = torch.cat([io.embeddings(o, b) for o, b in zip(candidate, batches)])
        metrics.append(MetricValue("pooled_cosine", float(F.cosine_similarity(ref_pooled, got_pooled, dim=-1).mean()),
                                   1.0))
        if io.classifier is not None:
            ref_logits, got_logits = torch.cat(answers(reference)), torch.cat(answers(candidate))
            ref_pred, got_pred = ref_logits.argmax(-1), got_logits.argmax(-1)
            metrics += [MetricValue("top1_agreement", float((ref_pred == got_pred).float().mean()), 1.0),
                        label_shift(ref_logits, got_logits)]
            if labels is not None:
                metrics.append(MetricValue("label_accuracy", float((got_pred == labels).float().mean()),
                                           float((ref_pred == labels).float().mean())))
        return metrics

    ties = {"near_ties": 0, "items": 0}
    if decoder or io.classifier is not None:
        with torch.no_grad():
            reference_answers = torch.cat(answers([model(b) for b in batches]))
        if decoder and reference_answers.shape[0] == 0:
            raise ValueError(f"{name}: no text has 2 tokens or more, so there is no next token to score")
        ties = {"near_ties": int((top2_margins(reference_answers) < NEAR_TIE_MARGIN).sum()),
                "items": int(reference_answers.shape[0])}
    return EvalSet(name, model, batches, score, gather_hidden=decoder, description=f"{len(batches)} batches"), ties


PRIMARY_METRIC = {"text-decoder": DECODER_BUDGET_METRIC, "text-encoder": "pooled_cosine",
                  "image-encoder": "pooled_cosine"}
"""The metric each codec's settings are chosen by on the calibration split. Encoders: the continuous
pooled cosine (it ranks settings that a top-1 agreement of a small split would call equal). Decoders: the
metric their budget is on (`evaluate.metrics`), counted over every prompt position (thousands, not a few
items); perplexity breaks its ties (`SECONDARY_METRIC`)."""

SECONDARY_METRIC = {"text-decoder": "perplexity"}
"""Where a task has one: the metric that breaks ties of `PRIMARY_METRIC` among a codec's settings."""

Progress = Callable[[str], None]
