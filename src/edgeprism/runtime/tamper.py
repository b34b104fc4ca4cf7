"""A worker's report that a lane message it received did not open (edgeprism.comm.sealing), so that rank 0
can drop the peer at fault even when the worker, not rank 0, caught it.

The worker writes `tamper/{slot}` (its join slot), sealed with its session key: `{"op": "tamper", "epoch",
"rank"}` with the sender's rank. Rank 0 reads each admitted session's key between requests
(`read_reports`), checks the seal (a stranger on the store cannot blame anyone) and drops the sender — or
the reporter, when the message that did not open came from rank 0 itself (then it is the reporter's link
to rank 0 that is not safe; it joins again with a new session and, in the next epoch, new keys).
"""

from __future__ import annotations

import logging

from edgeprism.comm.auth import seal
from edgeprism.runtime.control import ControlError, Session, decode_control, encode_control

log = logging.getLogger(__name__)


def report_tamper(store, session: Session, epoch: int, rank: int) -> None:
    """Worker: the lane message from `rank` in `epoch` did not open."""
    body = encode_control({"op": "tamper", "epoch": epoch, "rank": rank})
    store.set(f"tamper/{session.slot}", seal(session.key, b"tamper", session.slot, body))


def read_reports(store, sessions: dict[int, Session]) -> list[tuple[int, int, int]]:
    """Rank 0: (reporting rank, blamed rank, epoch) of every authentic report since the last call."""
    found = []
    for rank, session in sorted(sessions.items()):
        key = f"tamper/{session.slot}"
        if not store.check([key]):
            continue
        blob = store.get(key)
        store.delete_key(key)
        try:
            message = decode_control(session.key, b"tamper", session.slot, blob)
        except ControlError as err:
            log.warning("a tamper report for rank %d's session was refused: %s", rank, err)
            continue
        found.append((rank, message["rank"], message["epoch"]))
    return found


__all__ = ["read_reports", "report_tamper"]
