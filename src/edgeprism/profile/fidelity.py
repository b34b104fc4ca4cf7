"""The profile's codec section: each codec's exact wire cost, and its fidelity where it was measured.

Fidelity comes from the evaluation (`edgeprism.evaluate.fidelity.evaluate` on the model's evaluation
set), run here when the model has one, or imported from the rows `edgeprism eval --out` wrote.
A codec with no measured row is recorded as unmeasured (loss None); the planner then treats it as
the user's fidelity budget says.

One codec may have several rows (several evaluation sets and metrics): the profile keeps the worst
(largest loss) of the rows measured with the runtime's defaults (`partition.transform.DEFAULT_SIZE_AWARE`
and `DEFAULT_AVERAGE`) — a budget must hold on every set. Rows of a metric that is only reported
(`evaluate.metrics.SECONDARY_METRICS`: a decoder's perplexity) are kept only when a codec has no other: its
entry then records that loss, and the planner treats the codec as unmeasured and says why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgeprism.evaluate.metrics import LABEL_SHIFT_METRIC, is_budget_metric
from edgeprism.profile.jsondata import read_data_file
from edgeprism.profile.schema import CodecFidelity

log = logging.getLogger(__name__)

_REQUIRED = ("codec", "metric", "value", "reference_value")


def load_fidelity_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an `edgeprism eval --out` file (JSON lines); ValueError naming the line for anything malformed."""
    path = Path(path)
    text = read_data_file(path, "fidelity file", " (write one with `edgeprism eval --out FILE`)")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}:{number}: not a JSON row ({err}); expected lines from `edgeprism eval --out`"
            ) from None
        if not isinstance(row, dict) or any(key not in row for key in _REQUIRED):
            raise ValueError(f"{path}:{number}: a fidelity row needs the fields {list(_REQUIRED)}, got "
                             f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")
        for key in ("value", "reference_value"):
            if isinstance(row[key], bool) or not isinstance(row[key], (int, float)):
                raise ValueError(f"{path}:{number}: {key} must be a number, got {row[key]!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"fidelity file {path} has no rows")
    return rows


def select_rows(rows: Sequence[Mapping[str, Any]], model_name: str, world_size: int) -> dict[str, Mapping[str, Any]]:
    """codec name → its worst row for this model and world size (rows of a budget metric first, then rows with
    the runtime's defaults)."""
    from edgeprism.partition.transform import DEFAULT_AVERAGE, DEFAULT_SIZE_AWARE

    def runtime_default(row: Mapping[str, Any]) -> bool:
        return (bool(row.get("size_aware", False)) == DEFAULT_SIZE_AWARE
                and row.get("average", "residual") == DEFAULT_AVERAGE)

    usable = [r for r in rows if _for(r, model_name, world_size)]
    skipped = len(rows) - len(usable)
    if skipped:
        log.warning("%d fidelity row(s) are for another model or world size than %s over %d ranks; ignored",
                    skipped, model_name, world_size)
    chosen: dict[str, Mapping[str, Any]] = {}
    for row in usable:
        name = str(row["codec"])
        loss = _row_loss(row)
        best = chosen.get(name)
        if best is None:
            chosen[name] = row
            continue
        # Rows of a budget metric win, then rows with the runtime's default weighting; among equals, the larger loss.
        key_new = (is_budget_metric(str(row["metric"])), runtime_default(row), loss)
        key_old = (is_budget_metric(str(best["metric"])), runtime_default(best), _row_loss(best))
        if key_new > key_old:
            chosen[name] = row
    return chosen


def label_shifts(rows: Sequence[Mapping[str, Any]], model_name: str, world_size: int) -> dict[str, float]:
    """codec name → the largest `evaluate.metrics.LABEL_SHIFT_METRIC` over its rows for this model and world size
    (over every set: the near-tie guard must cover the worst)."""
    shifts: dict[str, float] = {}
    for row in rows:
        if row["metric"] == LABEL_SHIFT_METRIC and _for(row, model_name, world_size):
            name = str(row["codec"])
            shifts[name] = max(shifts.get(name, 0.0), float(row["value"]))
    return shifts


def _for(row: Mapping[str, Any], model_name: str, world_size: int) -> bool:
    """Whether a fidelity row was measured for this model and world size (a row without them counts for any)."""
    return row.get("model", model_name) == model_name and int(row.get("world_size", world_size)) == world_size


def _row_loss(row: Mapping[str, Any]) -> float:
    if row.get("loss") is not None:
        return min(1.0, max(0.0, float(row["loss"])))
    return CodecFidelity.normalised_loss(float(row["value"]), float(row["reference_value"]))


def codec_entries(codecs: Sequence[Any], hidden_size: int, rows: Mapping[str, Mapping[str, Any]] | None = None,
                  num_layers: int | None = None,
                  shifts: Mapping[str, float] | None = None) -> tuple[CodecFidelity, ...]:
    """One profile entry per codec: wire bytes from the codec itself (per layer, the mean over the model's
    `num_layers` exchanges: needed for stateful codecs such as delta), fidelity from `rows` where present, the
    label shift from `shifts` (`label_shifts`) where measured."""
    out = []
    for codec in codecs:
        row = (rows or {}).get(codec.name)
        entry = CodecFidelity.from_codec(codec, hidden_size, num_layers=num_layers)
        if row is not None:
            entry = replace(entry, metric=str(row["metric"]), value=float(row["value"]),
                            reference_value=float(row["reference_value"]), loss=_row_loss(row))
        if shifts and codec.name in shifts:
            entry = replace(entry, label_shift=min(2.0, shifts[codec.name]))
        out.append(entry)
    return tuple(out)


def evaluate_fidelity(model_name: str, codec_names: Sequence[str], world_size: int, limit: int | None,
                      progress: Callable[[str], None] | None = None) -> tuple[list[dict[str, Any]], str]:
    """Run the model's evaluation set for every codec → (rows, note). No set (or no prepared assets): no
    rows, and the note says why."""
    from edgeprism.evaluate.eval_sets import eval_sets_for
    from edgeprism.evaluate.fidelity import evaluate

    try:
        sets = eval_sets_for(model_name, limit, progress=progress)
    except (ValueError, OSError, ImportError) as err:
        return [], f"fidelity not measured: {err}"
    rows: list[dict[str, Any]] = []
    for eval_set in sets:
        rows += [r.to_dict() for r in evaluate(eval_set, list(codec_names), world_size, progress=progress)]
    names = ", ".join(s.name for s in sets)
    synthetic = " (random weights: a harness check, not a fidelity claim)" if model_name.endswith("-test") else ""
    return rows, f"fidelity measured on {names}, {limit or 'all'} requests per set{synthetic}"


__all__ = ["codec_entries", "evaluate_fidelity", "label_shifts", "load_fidelity_rows", "select_rows"]
