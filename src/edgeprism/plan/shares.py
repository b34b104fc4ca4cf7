"""Token shares over devices of different speeds: the splits the planner weighs for one rank group.

Shares proportional to speed balance the per-token work but not the rest of a layer: every rank pays the
fixed cost and the K/V rows of what it receives whatever its share, so a slow device given its
proportional share finishes last. `balanced_weights` levels the predicted layer time instead, under the
cost model's own layer formula (`plan.cost`):

    t_p(n) = (a + b_tok·B·n + (b_kv·B + b_tok_kv·B·n) · kv(n)) / speed_p,
    kv(n)  = n + rho · (N - n)        (rho = vectors the codec sends per token: 1 at CR 1, ~1/cr with Segment Means)

(a kv share, whose receivers do not project the K/V of the fraction f of the others' tokens that arrives as
keys and values, takes b_kv·B·f·(N - n) off), so t_p is a quadratic in n; the level T with sum_p n_p(T) = N is
found by bisection and each n_p(T) in closed form (a rank whose fixed cost alone exceeds T gets ~0 and is
rounded up to one token; dropping it altogether is the planner's choice of rank group). GLOO's all-gather pads
every message to the largest, so the network favours equal shares; `candidate_splits` therefore also offers
blends of the balanced split towards the equal one, and the planner keeps whichever its cost model scores
best.

Decoders (causal) see only earlier ranks' vectors; the same formula with rho halved stands for the
average rank. Pure arithmetic, like the rest of `plan`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from edgeprism.partition.ranges import apportion
from edgeprism.plan.constants import CostConstants
from edgeprism.profile.schema import CodecFidelity

SPLIT_BLENDS = (0.0, 0.25, 0.5)
"""Candidate splits: the balanced weights moved this fraction of the way to the equal split."""
RHO_STEPS = 50
ENDS_MEMO_SIZE = 512
"""Balanced ends kept per profile instance across planner calls (cleared when full)."""
_BISECTIONS = 24
"""2^-24 of the level: far finer than one token of 4096."""


@dataclass
class SplitCache:
    """Splits already found for one rank group and request (one planner call): the balanced weights at
    the two ends rho = 0 and 1, and the splits per rho (codecs of one ratio share them). `ends_memo`: the
    ends by (speeds, batch, tokens) across calls — a pure function's results, kept by the planner on the
    profile instance (`Profile.derived`), so a stream of alike requests solves them once."""

    ends: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    by_rho: dict[float | tuple[float, float, bool], list[tuple[int, ...]]] = field(default_factory=dict)
    ends_memo: dict[tuple, tuple[tuple[float, ...], tuple[float, ...]]] | None = None


def visible_fraction(codec: CodecFidelity | None, num_tokens: int, causal: bool) -> float:
    """rho: key/value rows a rank gets per token another rank owns (1 at CR 1; none: full exchange)."""
    rho = 1.0 if codec is None else min(1.0, codec.num_vectors(num_tokens) / num_tokens)
    return rho / 2 if causal else rho


def _tokens_at(level_s: float, speed: float, c0: float, c1: float, c2: float) -> float:
    """Largest n >= 0 with (c0 + c1 n + c2 n²) / speed <= level_s."""
    budget = level_s * speed - c0
    if budget <= 0:
        return 0.0
    if c2 <= 0:
        return budget / c1 if c1 > 0 else math.inf
    return (-c1 + math.sqrt(c1 * c1 + 4 * c2 * budget)) / (2 * c2)


def balanced_weights(constants: CostConstants, batch: int, speeds: Sequence[float], num_tokens: int,
                     rho: float, spared: float = 0.0) -> tuple[float, ...]:
    """Real token counts per rank (summing to `num_tokens`) that give every rank the same predicted layer
    time; see the module docstring. `spared`: of another rank's tokens, the fraction that arrives as keys and
    values (a kv share: no K/V projection for them). All speeds equal: the equal split."""
    c = constants
    n_all = float(num_tokens)
    # t(n) · speed = c0 + c1 n + c2 n²
    c0 = c.fixed_s + c.per_kv_s * batch * (rho - spared) * n_all
    c1 = batch * (c.per_token_s + c.per_kv_s * (1 - rho + spared) + c.per_token_kv_s * rho * n_all)
    c2 = batch * c.per_token_kv_s * (1 - rho)
    if c1 <= 0 and c2 <= 0:
        return tuple(n_all * s / sum(speeds) for s in speeds)
    low, high = 0.0, (c0 + c1 * n_all + c2 * n_all * n_all) / min(speeds)
    for _ in range(_BISECTIONS):
        mid = (low + high) / 2
        if sum(_tokens_at(mid, s, c0, c1, c2) for s in speeds) < n_all:
            low = mid
        else:
            high = mid
    weights = [_tokens_at(high, s, c0, c1, c2) for s in speeds]
    total = sum(weights)
    return tuple(n_all * w / total for w in weights)


def candidate_splits(constants: CostConstants, batch: int, speeds: Sequence[float], num_tokens: int,
                     codec: CodecFidelity | None, cache: SplitCache | None = None,
                     blends: bool = True) -> list[tuple[int, ...]]:
    """Whole-token splits to weigh for one group and codec: the balanced one first, then (`blends`) its
    blends towards equal shares (`SPLIT_BLENDS`), without repeats. Every rank gets at least one token.
    `cache`: what this planner call already found for the same group and request."""
    if max(speeds) == min(speeds):
        return [apportion(num_tokens, speeds)]  # equal devices: the equal split is balanced
    cache = cache if cache is not None else SplitCache()
    # rho to 1/50: the split moves by less than a token between neighbours, and codecs of about one
    # ratio (sm4, sm4a, sm4+int8) share one entry
    rho = round(visible_fraction(codec, num_tokens, constants.causal) * RHO_STEPS) / RHO_STEPS
    # a kv share: the fraction of the others' tokens whose K/V arrive projected (plan/cost.py)
    spared = 0.0 if codec is None else codec.kv_tokens(num_tokens) / num_tokens / (2 if constants.causal else 1)
    key: float | tuple[float, float, bool] = (rho if blends else -1.0 - rho) if not spared else (rho, spared, blends)
    if key in cache.by_rho:
        return cache.by_rho[key]
    if spared:  # solved on its own, not interpolated between the ends
        balanced = list(balanced_weights(constants, batch, speeds, num_tokens, rho, spared))
    else:
        # The two ends solved once per group, codecs in between interpolated: exact at CR 1 and close
        # elsewhere (the rounding to whole tokens is coarser than the difference).
        if cache.ends is None:
            memo_key = (tuple(speeds), batch, num_tokens)
            cache.ends = None if cache.ends_memo is None else cache.ends_memo.get(memo_key)
            if cache.ends is None:
                cache.ends = (balanced_weights(constants, batch, speeds, num_tokens, 0.0),
                              balanced_weights(constants, batch, speeds, num_tokens, 1.0))
                if cache.ends_memo is not None:
                    if len(cache.ends_memo) >= ENDS_MEMO_SIZE:
                        cache.ends_memo.clear()
                    cache.ends_memo[memo_key] = cache.ends
        balanced = [(1 - rho) * w0 + rho * w1 for w0, w1 in zip(*cache.ends)]
    k = len(speeds)
    splits: list[tuple[int, ...]] = []
    for blend in SPLIT_BLENDS if blends else SPLIT_BLENDS[:1]:
        weights = [(1 - blend) * w + blend * num_tokens / k for w in balanced]
        counts = apportion(num_tokens, [max(w, 1e-9) for w in weights])
        if counts not in splits:
            splits.append(counts)
    cache.by_rho[key] = splits
    return splits


def split_grid(num_tokens: int, k: int, step: float = 0.05) -> list[tuple[int, ...]]:
    """Every split of `num_tokens` over `k` ranks in share steps of `step` (each rank >= one step): the
    oracle's search space in tests and benchmarks."""
    units = round(1 / step)
    out: list[tuple[int, ...]] = []

    def rec(prefix: list[int], left: int, slots: int) -> None:
        if slots == 1:
            shares = [*prefix, left]
            out.append(apportion(num_tokens, [u / units for u in shares]))
            return
        for u in range(1, left - slots + 2):
            rec([*prefix, u], left - u, slots - 1)

    if k == 1:
        return [(num_tokens,)]
    rec([], units, k)
    return sorted(set(out))


__all__ = ["SPLIT_BLENDS", "SplitCache", "balanced_weights", "candidate_splits", "split_grid", "visible_fraction"]
