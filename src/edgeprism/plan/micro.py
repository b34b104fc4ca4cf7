"""How many micro-batches a distributed plan runs its batch as: chosen per request by the cost model.

More micro-batches hide more of each layer's exchange (one slice's bytes travel while the others compute) but
each pays the layer's per-call cost again and its own link hops (plan/pipeline.py). Which count is best depends
on the batch, the devices and the link: on 4 devices of half a core over wifi4 at batch 8, 4 slices ran 5 %
faster than 2 in one interleaved run and 13 % slower in the next (`scripts/bench_speed.py --variants mb2,mb4`,
benchmarks/results/devices/README.md); at batch 1 there is nothing to slice. So where the engine leaves the count
open (`EngineConfig.micro_batches` None), the link estimate carries the counts it may run
(`LinkEstimate.micro_batch_choices`), the planner costs each plan at every one of them and keeps the best, and
the plan says which (`Plan.micro_batches`): rank 0 runs it and sends it to the workers in the request header.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from edgeprism.plan.cost import objective_score
from edgeprism.plan.types import LinkEstimate, Plan

MICRO_BATCH_CHOICES: tuple[int, ...] = (2, 4)
"""The counts the engine may run when it leaves the choice to the planner (`EngineConfig.micro_batches` None).
Not 1 where a batch can be sliced: 2 slices beat 1 in every measured encoder point from batch 4 on and cost one
extra call per layer (~5 ms of CPU at ViT-B/16) elsewhere, while the fitted per-call cost that decides between
them is noisy on a busy host (a 1.0 + 0.4-core profile measured with load 3.7 fitted it so high that fixed splits
were planned unsliced and ran 1.5–2× slower than sliced; benchmarks/results/devices/README.md, ninth session)."""


def with_micro_batches(link: LinkEstimate, count: int | None) -> LinkEstimate:
    """`link` costed as a runtime that runs `count` micro-batches (None: the planner's choice of
    `MICRO_BATCH_CHOICES`, the first of them where one count is costed, as `enumerate_candidates` does) — what
    `EngineConfig.micro_batches` means."""
    return dataclasses.replace(link, micro_batches=count or MICRO_BATCH_CHOICES[0],
                               micro_batch_choices=MICRO_BATCH_CHOICES if count is None else ())


def micro_batch_options(link: LinkEstimate, batch: int, causal: bool) -> tuple[int, ...]:
    """The counts to cost for a request of `batch` rows: the link's fixed count when it offers no choice; one
    when the exchange is not overlapped or the model is a decoder (the runtime slices only an encoder's
    overlapped path); else each offered count up to the batch (a slice holds one row at least), or 1 if none."""
    if not link.micro_batch_choices:
        return (link.micro_batches,)
    if not link.overlap or causal:
        return (1,)
    return tuple(m for m in link.micro_batch_choices if m <= batch) or (1,)


def best_over_micro_batches(plan_at: Callable[[LinkEstimate], Plan], link: LinkEstimate, batch: int, causal: bool,
                            objective: str) -> Plan:
    """`plan_at(link with one count)` for each of `micro_batch_options`, the best under `objective` (a plan
    within the limits before one outside them; ties keep the fewer micro-batches), with its count recorded
    (`Plan.micro_batches`; a local plan keeps 1)."""
    options = micro_batch_options(link, batch, causal)
    best: tuple[tuple[bool, float], Plan] | None = None
    for m in options:
        plan = plan_at(dataclasses.replace(link, micro_batches=m, micro_batch_choices=()))
        if plan.mode == "distributed":
            reason = plan.reason if len(options) == 1 else f"{plan.reason}; {m} micro-batch(es) of {list(options)}"
            plan = dataclasses.replace(plan, micro_batches=m, reason=reason)
        key = (not plan.within_limits, objective_score(objective, plan.predicted_latency_s, plan.predicted_energy_j))
        if best is None or key < best[0]:
            best = (key, plan)
    assert best is not None
    return best[1]


__all__ = ["MICRO_BATCH_CHOICES", "best_over_micro_batches", "micro_batch_options", "with_micro_batches"]
