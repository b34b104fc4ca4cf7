"""Near ties answered exactly: the rows of a classifier's answer that a reduced-precision exchange may have
flipped are rerun on one device.

A codec's error moves every answer a little; it changes a label only where the split answered with a small
margin. If one device prefers label a and the split label b, the difference p_b - p_a went from <= 0 to the
split's own top-2 margin m, so the codec changed the difference of two labels' probabilities by at least m.
The evaluation measures the largest such change per codec and model (`evaluate.metrics.LABEL_SHIFT_METRIC`,
recorded in the profile as the codec's `label_shift`); a guard margin above it reruns every row that could have
flipped on the evaluated data, so there the answer equals one device's on every row while the split still
serves the rows that were not close. The default margin is GUARD_HEADROOM x the measured shift (fp16 moves
probabilities by ~0.001, so it reruns almost nothing; a coarse codec reruns more), DEFAULT_GUARD_MARGIN
where the profile has none. Measured: docs/METHODOLOGY.md, "The near-tie guard".

Only answers that did not come from exact arithmetic are checked: a distributed plan whose wire is not fp32
(fp16 and bf16 are lossless for the planner's fidelity budget, yet bf16 moved 1 of 200 probe labels on
DINOv2-S). The rerun is a real local request on the same engine (its own metrics row).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from edgeprism.compress.registry import wire_format_name
from edgeprism.plan.planner import static_plan
from edgeprism.runtime.metrics import MetricsRow, Result

GUARD_HEADROOM = 1.5
"""The guard's margin over a codec's measured label shift (the profile's `label_shift`): room for inputs that
move more than the evaluation set's worst."""

DEFAULT_GUARD_MARGIN = 0.05
"""The margin where the profile has no label shift for the codec (no classifier was evaluated, an older profile,
an unmeasured codec)."""


def guard_margin(profile, codec: str, fixed: float | None = None) -> float:
    """The top-2 margin under which a row answered by a split over `codec` is rerun: `fixed` when given (0: off);
    else GUARD_HEADROOM × the codec's measured `label_shift` in `profile`; DEFAULT_GUARD_MARGIN where unmeasured."""
    if fixed is not None:
        return fixed
    try:
        shift = profile.codec(codec).label_shift
    except ValueError:  # a forced plan's codec the profile does not list
        shift = None
    return DEFAULT_GUARD_MARGIN if shift is None else min(0.999, GUARD_HEADROOM * shift)


def exact_answer(metrics: MetricsRow) -> bool:
    """True when the answer came from one device or from a split that exchanged fp32 (float rounding only)."""
    if metrics.mode == "local" or metrics.fallback:
        return True
    return wire_format_name(str(metrics.plan.get("codec") or "")) == "fp32"


def label_margins(labels: Sequence[Sequence[tuple[str, float]]]) -> list[float]:
    """The top-2 score margin of each row of a classifier's (label, score) lists, best first (>= 2 labels asked
    for); inf for a row with one label. (From logits: `evaluate.fidelity.top2_margins`.)"""
    return [pairs[0][1] - pairs[1][1] if len(pairs) >= 2 else float("inf") for pairs in labels]


def rows_to_rerun(margins: Sequence[float], guard_margin: float) -> list[int]:
    """The rows whose answered margin is below `guard_margin` (0: none)."""
    if guard_margin < 0:
        raise ValueError(f"guard margin {guard_margin} must be >= 0 (0 turns the guard off)")
    return [i for i, margin in enumerate(margins) if margin < guard_margin]


def run_locally(engine, inputs: dict[str, Tensor], request_id: str) -> Result:
    """`inputs` answered by rank 0 alone (a forced local plan: a real request with its own metrics row)."""
    num_tokens = engine.model.validate_input(inputs)
    plan = static_plan(engine.profile, engine.request_of(inputs, num_tokens), engine.link_estimate, "local")
    return engine.infer(inputs, request_id=request_id, plan=plan)


def take_rows(tensors: dict[str, Tensor], rows: Sequence[int]) -> dict[str, Tensor]:
    """The given rows of every (B, ...) tensor."""
    index = torch.tensor(list(rows), dtype=torch.long)
    return {name: value.index_select(0, index.to(value.device)) for name, value in tensors.items()}


def splice_rows(outputs: dict[str, Tensor], rows: Sequence[int], rerun: dict[str, Tensor]) -> dict[str, Tensor]:
    """`outputs` with `rows` replaced by the rerun's rows (same keys, same trailing shapes)."""
    missing = sorted(set(outputs) - set(rerun))
    if missing:
        raise ValueError(f"the rerun answered without {missing}")
    index = torch.tensor(list(rows), dtype=torch.long)
    spliced = {}
    for name, value in outputs.items():
        if rerun[name].shape[1:] != value.shape[1:]:
            raise ValueError(f"the rerun's {name!r} is {tuple(rerun[name].shape)}, the answer's {tuple(value.shape)}")
        spliced[name] = value.index_copy(0, index.to(value.device), rerun[name].to(value.device, value.dtype))
    return spliced


__all__ = ["DEFAULT_GUARD_MARGIN", "GUARD_HEADROOM", "exact_answer", "guard_margin", "label_margins", "rows_to_rerun",
           "run_locally", "splice_rows", "take_rows"]
