"""Each codec's settings chosen on a calibration split of the user's data, then reported on the rest.

What a codec name leaves open and the data can decide is its low-bit formats' outlier channels and
rotation (`lb<B>[o<K>][r]`, compress/lowbit.py, inside plain, Segment Means and delta codecs alike):
the bits stay as the user wrote them, and the variants tried are K in `OUTLIER_CHOICES` (plus the K
written) with and without the rotation, the same for every low-bit format of the codec. The variant
with the least loss of the task's primary metric (`user_data.PRIMARY_METRIC`: a decoder's next-token
agreement, an encoder's pooled cosine) on the calibration split wins (signed: a variant scoring better than
the single device ranks first); ties go to the least loss of the task's secondary metric where it has one
(a decoder's perplexity), then to the fewer bytes, then to the name as written. Codecs with no low-bit
format run as written.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from edgeprism.compress.registry import get_codec
from edgeprism.evaluate.fidelity import evaluate
from edgeprism.evaluate.user_data import (
    PRIMARY_METRIC,
    SECONDARY_METRIC,
    DataItem,
    Progress,
    encode_batches,
    label_indices,
    user_eval_set,
)
from edgeprism.inputs.io import ModelIO
from edgeprism.models.base import ReferenceModel

log = logging.getLogger(__name__)

OUTLIER_CHOICES = (0, 2, 4, 8)
"""Exact outlier channels tried per low-bit vector (4 bytes each: fp16 value + uint16 index)."""

_LOW_BIT = re.compile(r"lb(?P<bits>\d+)(?:o(?P<outliers>\d+))?(?P<rotate>r)?")


def codec_variants(name: str) -> list[str]:
    """Canonical names of the settings tried for `name` (just `name`, canonical, when it has no low-bit format)."""
    canonical = str(get_codec(name))
    written = [int(m["outliers"] or 0) for m in _LOW_BIT.finditer(canonical)]
    if not written:
        return [canonical]
    variants = [canonical]
    for outliers in sorted(set(OUTLIER_CHOICES) | set(written)):
        for rotate in ("", "r"):
            variant = _LOW_BIT.sub(lambda m, k=outliers, r=rotate: f"lb{m['bits']}" + (f"o{k}" if k else "") + r,
                                   canonical)
            variant = str(get_codec(variant))
            if variant not in variants:
                variants.append(variant)
    return variants


def _signed_loss(rows: Sequence[Any], codec: str, metric: str) -> float:
    """How much worse than the single device `codec` scored on `metric`, relative, signed (a codec that
    happens to score better ranks better, where `FidelityRow.loss` would call it 0)."""
    row = next(r for r in rows if r.codec == codec and r.metric == metric)
    worse = row.value - row.reference_value if metric == "perplexity" else row.reference_value - row.value
    return worse / abs(row.reference_value) if row.reference_value else worse


def evaluate_user_data(model: ReferenceModel, io: ModelIO, items: Sequence[DataItem], codecs: Sequence[str],
                       world_size: int, shares: tuple[float, ...] | None = None,
                       calibration: Sequence[DataItem] = (), batch_size: int = 8, data_name: str = "data",
                       progress: Progress | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows for `items`, one per (codec, metric), in the `edgeprism eval --out` format; the calibration
    report {codec as written: {"chosen": name, "losses": {variant: loss}}}). With `calibration` items each
    codec's settings are first chosen on them; without, every codec runs as written."""
    chosen: dict[str, str] = {}
    report: dict[str, Any] = {}
    metric, tie_break = PRIMARY_METRIC[io.task], SECONDARY_METRIC.get(io.task)
    if calibration:
        batches, order = encode_batches(io, calibration, batch_size)
        calib_set, _ = user_eval_set(f"{data_name}:calibration", model, io, batches,
                                     label_indices(io, calibration, order))
        for name in codecs:
            variants = codec_variants(name)
            if len(variants) == 1:
                chosen[name] = variants[0]
                continue
            rows = evaluate(calib_set, variants, world_size, shares, progress=progress)
            losses = {v: _signed_loss(rows, v, metric) for v in variants}
            second = {v: _signed_loss(rows, v, tie_break) if tie_break else 0.0 for v in variants}
            nbytes = {r.codec: r.bytes_per_request for r in rows}
            chosen[name] = min(variants, key=lambda v: (losses[v], second[v], nbytes[v], v != variants[0]))
            report[name] = {"chosen": chosen[name], "metric": metric, "losses": losses,
                            "num_items": len(calibration)}
            log.info("%s: %s chosen on %d calibration items (%s loss %.3g)", name, chosen[name], len(calibration),
                     metric, losses[chosen[name]])
    names = [chosen.get(name, str(get_codec(name))) for name in codecs]
    batches, order = encode_batches(io, items, batch_size)
    eval_set, ties = user_eval_set(data_name, model, io, batches, label_indices(io, items, order))
    rows = []
    for row in evaluate(eval_set, list(dict.fromkeys(names)), world_size, shares, progress=progress):
        entry = row.to_dict()
        entry["split"] = "report" if calibration else "all"
        written = [name for name, used in zip(codecs, names) if used == row.codec]
        if written and written[0] in report:
            entry["chosen_from"] = written[0]
        if row.metric in ("top1_agreement", "next_token_agreement"):
            entry.update(ties)
        rows.append(entry)
    return rows, report


__all__ = ["OUTLIER_CHOICES", "codec_variants", "evaluate_user_data"]
