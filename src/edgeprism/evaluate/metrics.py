"""What each fidelity metric is for: which metric a fidelity budget is set on, and which are only reported.

A decoder's answer is its greedy next token, so its budget is on `next_token_agreement` (the share of real
prompt positions whose single-device argmax the split model reproduces). Perplexity averages the log
probability of the *text's* next token and barely moves when a near-tied argmax flips: SmolLM2-135M's int4
wire cost 0.44 % of perplexity but 3.4 % of next-token agreement, and its first generated token equalled one
device's in 3 of 6 requests (docs/METHODOLOGY.md, "Fidelity"). It is reported beside agreement, never budgeted.

No torch here: `profile/` and `plan/` read these declarations without loading the evaluation harness.
"""

from __future__ import annotations

LABEL_SHIFT_METRIC = "label_shift"
"""The largest change the split made, over a set's items, in the difference of any two labels' softmax
probabilities (max over labels of the change minus min over labels of the change, then max over items). A
label flips only where that change exceeds the margin the split answered with, so a near-tie guard above it
(runtime/guard.py) reruns every row that could have flipped on this set. Reported, never budgeted."""

SECONDARY_METRICS: frozenset[str] = frozenset({"perplexity", LABEL_SHIFT_METRIC})
"""Metrics reported beside a budget metric and never budgeted on: a codec measured by these alone counts as
unmeasured (the planner says so in its notes; `--allow-unmeasured-codecs` is the opt-in)."""

DECODER_BUDGET_METRIC = "next_token_agreement"
"""The metric a decoder's fidelity budget applies to: loss = 1 - agreement, over every real prompt position."""


def is_budget_metric(metric: str | None) -> bool:
    """Whether a fidelity budget may be checked against a loss measured by `metric` (None: nothing measured)."""
    return metric is not None and metric not in SECONDARY_METRICS


__all__ = ["DECODER_BUDGET_METRIC", "LABEL_SHIFT_METRIC", "SECONDARY_METRICS", "is_budget_metric"]
