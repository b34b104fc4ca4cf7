"""Contiguous token ranges per rank: the one splitter the cost model and the runtime share."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenRange:
    """Rank `group_rank` owns tokens [start, end) of every request row."""

    group_rank: int
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"rank{self.group_rank}[{self.start}:{self.end})"


def validate_shares(shares: tuple[float, ...] | list[float], world_size: int | None = None) -> tuple[float, ...]:
    shares = tuple(float(s) for s in shares)
    if world_size is not None and len(shares) != world_size:
        raise ValueError(f"{len(shares)} shares {list(shares)} given for {world_size} ranks; give one per rank")
    if not shares:
        raise ValueError("no shares given; give one positive fraction per rank, e.g. 0.5,0.5")
    if any(not math.isfinite(s) or s <= 0 for s in shares):
        raise ValueError(f"shares {list(shares)} must all be > 0; drop a rank instead of giving it 0")
    if abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"shares {list(shares)} sum to {sum(shares):.6g}, not 1; e.g. use "
                         f"{','.join(f'{s / sum(shares):.4g}' for s in shares)}")
    return shares


def equal_shares(world_size: int) -> tuple[float, ...]:
    return tuple(1.0 / world_size for _ in range(world_size))


def apportion(num_tokens: int, weights: Sequence[float]) -> tuple[int, ...]:
    """Whole tokens per rank, proportional to `weights` (shares or device speeds; largest remainder), every
    rank >= 1. The one splitter: the cost model costs these counts and the runtime runs them."""
    k = len(weights)
    if num_tokens < k:
        raise ValueError(f"{num_tokens} tokens cannot give {k} ranks one token each")
    total = sum(weights)
    ideal = [num_tokens * w / total for w in weights]
    counts = [max(1, int(x)) for x in ideal]
    left = num_tokens - sum(counts)
    if left > 0:  # fewer than k left over: one each to the ranks furthest below their ideal (lowest index on ties)
        above = [c - x for c, x in zip(counts, ideal)]
        for j in sorted(range(k), key=above.__getitem__)[:left]:  # stable sort: lowest index on ties
            counts[j] += 1
    while left < 0:  # minimum-one bumps overshot: take one from the rank furthest above its ideal
        j = max((j for j in range(k) if counts[j] > 1), key=lambda j: (counts[j] - ideal[j], -j))
        counts[j] -= 1
        left += 1
    return tuple(counts)


def ranges_of(counts: Sequence[int]) -> tuple[TokenRange, ...]:
    """Contiguous ranges in rank order: rank r owns the `counts[r]` tokens after ranks 0..r-1's."""
    ranges, start = [], 0
    for rank, count in enumerate(counts):
        if count < 1:
            raise ValueError(f"token counts {list(counts)}: every rank needs at least one token")
        ranges.append(TokenRange(rank, start, start + count))
        start += count
    return tuple(ranges)


def split_tokens(num_tokens: int, shares: tuple[float, ...] | list[float]) -> tuple[TokenRange, ...]:
    """Ranges for fractional shares, by `apportion` (the planner's own rounding); every rank >= 1 token."""
    shares = validate_shares(shares)
    if len(shares) > num_tokens:
        raise ValueError(f"{len(shares)} ranks for a request of {num_tokens} tokens; every rank needs at least one "
                         f"token: use at most {num_tokens} ranks or a longer input")
    ranges = ranges_of(apportion(num_tokens, shares))
    assert ranges[-1].end == num_tokens, ranges
    return ranges
