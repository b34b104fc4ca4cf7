"""The near-tie guard on the API's labelled answers (runtime/guard.py): rows a reduced-precision split answered
with a top-2 margin under the guard's (`ApiConfig.guard_margin`; by default from the codec's label shift in the
profile) are rerun on one device before the labels go out.

The rerun is a job of its own on the engine thread (a forced local plan), so the answer's `edgeprism` key lists
both engine calls and each rerun row says so (`"near_tie_rerun": true`).
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from torch import Tensor

from edgeprism.api.batching import Job, JobResult
from edgeprism.api.service import ApiService
from edgeprism.runtime.guard import (
    exact_answer,
    guard_margin,
    label_margins,
    rows_to_rerun,
    run_locally,
    splice_rows,
    take_rows,
)


@dataclass(frozen=True)
class Guarded:
    """A job's answer after the guard: its outputs (rerun rows spliced in), its labels (None: no classifier),
    the rows rerun on one device, and every engine call that served it."""

    outputs: dict[str, Tensor]
    labels: list[list[tuple[str, float]]] | None
    rerun_rows: list[int]
    results: list[JobResult]


async def guarded_labels(service: ApiService, result: JobResult, top_k: int, kind: tuple,
                         merge: str = "stack") -> Guarded:
    """Labels of `result`'s rows (best `top_k`), with the rows the guard flags answered again on one device.
    `kind` is the job's batching key (the rerun's is kept apart from ordinary jobs)."""
    io = service.io
    assert io is not None
    engine = service.engine
    margin = guard_margin(engine.profile, str(result.metrics.plan.get("codec") or ""), service.config.guard_margin)
    check = margin > 0 and not exact_answer(result.metrics)
    labels = await run_in_threadpool(io.classify, result.outputs, result.inputs, max(top_k, 2) if check else top_k)
    if labels is None or not check:
        return Guarded(result.outputs, labels, [], [result])
    rows = rows_to_rerun(label_margins(labels), margin)
    if not rows:
        return Guarded(result.outputs, [pairs[:top_k] for pairs in labels], [], [result])
    again = await service.run(Job((*kind, "near-tie rerun"), take_rows(result.inputs, rows),
                                  lambda x, rid: run_locally(engine, x, rid), f"{result.metrics.request_id}-near-ties",
                                  merge=merge))  # type: ignore[arg-type]
    outputs = splice_rows(result.outputs, rows, again.outputs)
    labels = await run_in_threadpool(io.classify, outputs, result.inputs, top_k)
    return Guarded(outputs, labels, rows, [result, again])


__all__ = ["Guarded", "guarded_labels"]
