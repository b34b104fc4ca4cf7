"""Contiguous token ranges per rank, from fractional shares."""

from __future__ import annotations

import math
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


def split_tokens(num_tokens: int, shares: tuple[float, ...] | list[float]) -> tuple[TokenRange, ...]:
    """Largest-remainder rounding of shares × num_tokens; every rank gets at least one token."""
    shares = validate_shares(shares)
    world_size = len(shares)
    if world_size > num_tokens:
        raise ValueError(f"{world_size} ranks for a request of {num_tokens} tokens; every rank needs at least one "
                         f"token: use at most {num_tokens} ranks or a longer input")
    exact = [s * num_tokens for s in shares]
    counts = [max(1, math.floor(x)) for x in exact]
    while sum(counts) > num_tokens:  # the max(1, ...) floor can overshoot: take from the largest
        counts[max(range(world_size), key=lambda i: counts[i])] -= 1
    order = sorted(range(world_size), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: num_tokens - sum(counts)]:
        counts[i] += 1
    ranges, start = [], 0
    for rank, count in enumerate(counts):
        ranges.append(TokenRange(rank, start, start + count))
        start += count
    assert start == num_tokens and all(r.num_tokens >= 1 for r in ranges), ranges
    return tuple(ranges)
