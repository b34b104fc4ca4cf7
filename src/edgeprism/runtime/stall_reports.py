"""What each rank had computed when a distributed request ran out of time, so that a device slowed far enough to
miss the request's deadline still teaches the speed estimate (issue 17: stragglers).

A request that completes tells rank 0 every rank's compute seconds in its telemetry
(`runtime.telemetry`); one that stalls — a device slowed to a quarter of its speed can take longer than the
deadline, max(min_stall_s, stall_factor x predicted) — is rerun on rank 0 and tells nothing, so the next
request planned over the same ranks stalls again. Here each rank of the failed request says how many layers it
finished and their compute seconds (its `partition.timeline.Timeline`: encode + compute, never waits): a
worker writes `stall/{slot}` (its join slot) sealed with its session key, as `runtime.tamper` does;
rank 0 reads the reports between requests (`read_stall_reports`) and folds the per-layer rates into
`runtime.compute_estimate` (`Rank0Side._learn_from_stall`), its own rate from its own timeline.
"""

from __future__ import annotations

from typing import NamedTuple

from edgeprism.plan import Plan, Request
from edgeprism.runtime.control import Session, post_report, take_reports


class StallReport(NamedTuple):
    """One rank's part of a request that failed: layers finished and their compute seconds."""

    epoch: int
    request_id: str
    layers_done: int
    compute_s: float


class PendingStall(NamedTuple):
    """Rank 0's side of a failed request while its workers' reports are awaited."""

    plan: Plan
    request: Request
    own: StallReport
    """Rank 0's own progress in it."""
    waits: int
    """Calls of `Rank0Side.maintain` left to wait for missing reports."""


def progress_of(epoch: int, request_id: str, timeline) -> StallReport:
    """This rank's progress in a request: the layers its `partition.timeline.Timeline` finished and their encode
    + compute seconds."""
    layers = timeline.layers
    return StallReport(epoch, request_id, len(layers), float(sum(layer.encode_s + layer.compute_s for layer in layers)))


def report_stall(store, session: Session, epoch: int, request_id: str, timeline) -> None:
    """Worker: our progress in request `request_id` of `epoch` when it failed."""
    post_report(store, session, "stall", {"op": "stall", **progress_of(epoch, request_id, timeline)._asdict()})


def read_stall_reports(store, sessions: dict[int, Session]) -> dict[int, StallReport]:
    """Rank 0: rank -> its authentic report since the last call (each is read once)."""
    return {rank: StallReport(m["epoch"], m["request_id"], m["layers_done"], float(m["compute_s"]))
            for rank, m in take_reports(store, sessions, "stall")}


__all__ = ["PendingStall", "StallReport", "progress_of", "read_stall_reports", "report_stall"]
