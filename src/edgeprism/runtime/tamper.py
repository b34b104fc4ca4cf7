"""A worker's report that a lane message it received did not open (edgeprism.comm.sealing), so that rank 0
can drop the peer at fault even when the worker, not rank 0, caught it.

The worker writes `tamper/{slot}` (its join slot), sealed with its session key: `{"op": "tamper", "epoch",
"rank"}` with the sender's rank. Rank 0 reads each admitted session's key between requests
(`read_reports`), checks the seal (a stranger on the store cannot blame anyone) and drops the sender — or
the reporter, when the message that did not open came from rank 0 itself (then it is the reporter's link
to rank 0 that is not safe; it joins again with a new session and, in the next epoch, new keys).
"""

from __future__ import annotations

from edgeprism.runtime.control import Session, post_report, take_reports


def report_tamper(store, session: Session, epoch: int, rank: int) -> None:
    """Worker: the lane message from `rank` in `epoch` did not open."""
    post_report(store, session, "tamper", {"op": "tamper", "epoch": epoch, "rank": rank})


def read_reports(store, sessions: dict[int, Session]) -> list[tuple[int, int, int]]:
    """Rank 0: (reporting rank, blamed rank, epoch) of every authentic report since the last call."""
    return [(rank, message["rank"], message["epoch"]) for rank, message in take_reports(store, sessions, "tamper")]


__all__ = ["read_reports", "report_tamper"]
