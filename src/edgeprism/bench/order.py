"""The order in which one round of an interleaved benchmark serves its strategies (docs/METHODOLOGY.md,
"Interleaving").

Each round serves the same request once per strategy, in a permutation drawn from a generator seeded by the round
number: every rank (and every rerun) computes the same order, and no strategy always follows the same one. Rotating
one fixed order by one position per round, as the benchmarks did before 2026-12-06, kept every strategy's
predecessor fixed, and what a strategy leaves behind then slowed the same successor in every round: in four runs
the adaptive engine, served right after tensor parallel, took 6-9 % longer at batch 1 than the very same local
plan served as `local`, which came right after it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def round_order(strategies: Sequence[T], round_: int) -> list[T]:
    """`strategies` in round `round_`'s order: a permutation seeded by the round (warm-up rounds are negative)."""
    order = list(strategies)
    random.Random(f"edgeprism round {round_}").shuffle(order)
    return order


__all__ = ["round_order"]
