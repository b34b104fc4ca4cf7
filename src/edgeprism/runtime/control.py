"""Control messages from rank 0 to the workers: over the rendezvous store, sealed, bounded and validated.

Each admitted worker has a session (edgeprism.comm.auth) and a mailbox in the store: rank 0 writes
message i to `ctl/{slot}/{i}` as `seal(session key, "ctl/{slot}", i, JSON)`; the worker waits for that
key, checks the size and the MAC, parses the JSON, checks it against `SCHEMA`, deletes the key and
moves to i + 1. Posting is one store write: unlike a collective it never waits for a dead, hung or
cut-off worker, so rank 0's control path survives any of them. Message bodies are at most
`MAX_CONTROL_BYTES`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta

from edgeprism.comm.auth import AuthError, open_sealed, seal
from edgeprism.comm.exchange import MAX_CONTROL_BYTES, ExchangeStats, PeerError
from edgeprism.compress.pixels import MAX_LEVELS
from edgeprism.plan import Plan
from edgeprism.runtime.cluster_jobs import check_job

log = logging.getLogger(__name__)

_NUMBER = (int, float)
SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "infer": {"request_id": str, "epoch": int, "plan": dict, "stall_s": _NUMBER, "split": dict},
    "probe": {"epoch": int, "ranks": list, "nbytes": int, "stall_s": _NUMBER},
    "ping": {"epoch": int},
    "job": {"epoch": int, "name": str, "args": dict},
    "epoch": {"epoch": int, "members": list, "timeout_s": _NUMBER, "build_timeout_s": _NUMBER, "sealed": bool},
    "shutdown": {},
    "release": {},
    "evicted": {"reason": str, "rejoin": bool},
    "admitted": {"rank": int},
    "refused": {"reason": str},
    "leave": {},
    "tamper": {"epoch": int, "rank": int},
    "stall": {"epoch": int, "request_id": str, "layers_done": int, "compute_s": _NUMBER},
}
"""Every control op and its required fields with their JSON types (extra fields are refused)."""

MAX_PROBE_BYTES = 64 << 20
LOOKAHEAD_S = 1.0
"""While waiting for message i, a worker looks this often for messages i + 1 .. i + LOOKAHEAD: one that
someone on the store deleted or overwrote is then skipped instead of stalling the mailbox for good."""
LOOKAHEAD = 4


class ControlError(PeerError):
    """A control message that is unauthenticated, oversized, not JSON or not of the schema."""


def validate_control(message: object) -> dict:
    """The message if it is one of `SCHEMA`'s ops with exactly its fields, of their types; else ControlError."""
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ControlError(f"a control message is an object with a string 'op', got {str(message)[:80]!r}")
    op = message["op"]
    if op not in SCHEMA:
        raise ControlError(f"unknown control op {op[:40]!r}; known: {', '.join(SCHEMA)}")
    fields = SCHEMA[op]
    extra = set(message) - set(fields) - {"op"}
    missing = set(fields) - set(message)
    if extra or missing:
        raise ControlError(f"control op {op!r}: missing {sorted(missing)}, unexpected {sorted(extra)[:5]}")
    for name, kind in fields.items():
        value = message[name]
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise ControlError(f"control op {op!r}: {name} must be {getattr(kind, '__name__', 'a number')}, "
                               f"got {type(value).__name__}")
    for name in ("ranks", "members"):
        if name in message and not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < 1 << 16
                                       for r in message[name]):
            raise ControlError(f"control op {op!r}: {name} must be rank numbers, got {message[name][:8]!r}")
    if op == "probe" and not 0 < message["nbytes"] <= MAX_PROBE_BYTES:
        raise ControlError(f"probe of {message['nbytes']} bytes is outside 1..{MAX_PROBE_BYTES}")
    if op == "infer":
        try:
            plan = Plan.from_dict(message["plan"])
        except ValueError as err:
            raise ControlError(f"control op 'infer': {err}") from None
        validate_split(message["split"], plan)
    if op == "job":  # a name of the fixed registry, with exactly its arguments: never code from the wire
        try:
            check_job(message["name"], message["args"])
        except ValueError as err:
            raise ControlError(str(err)) from None
    return message


_SPLIT_FIELDS = {"request": int, "ranges": list, "codec": str, "gather_hidden": bool, "generate": int, "parts": list,
                 "micro_batches": int}
"""The request's one header (`PositionWise.split`), carried in the "infer" op's `split` field."""
_PART_DTYPES = {"torch.int64", "torch.int32", "torch.float32", "torch.float16", "torch.bfloat16", "torch.bool"}


def validate_split(split: dict, plan: Plan) -> None:
    """A request's header (`PositionWise.split`) against the plan it came with: exactly its fields, of their
    types; one [start, end) pair of ints per rank of the plan, contiguous from 0 and covering [0, T) exactly
    as the plan's `token_ranges` (the counts the cost model costed); the plan's codec; one part per range,
    each a few named tensors of known dtypes and small rank."""
    if set(split) != set(_SPLIT_FIELDS):
        raise ControlError(f"request header fields {sorted(split)[:8]} are not {sorted(_SPLIT_FIELDS)}")
    for name, kind in _SPLIT_FIELDS.items():
        if (isinstance(split[name], bool) and kind is not bool) or not isinstance(split[name], kind):
            raise ControlError(f"request header: {name} must be {kind.__name__}")
    ranges, parts = split["ranges"], split["parts"]
    if not 1 <= len(ranges) == len(plan.ranks) == len(parts) or split["generate"] < 0:
        raise ControlError(f"request header: {len(ranges)} ranges and {len(parts)} parts for a plan of "
                           f"{len(plan.ranks)} ranks (generate {split['generate']})")
    start = 0
    for pair in ranges:
        if not (isinstance(pair, list) and len(pair) == 2 and all(type(x) is int for x in pair)
                and pair[0] == start < pair[1]):
            raise ControlError(f"request header: ranges {ranges[:8]!r} are not contiguous [start, end) pairs from 0")
        start = pair[1]
    planned = [[r.start, r.end] for r in plan.token_ranges]
    if ranges != planned:
        raise ControlError(f"request header: ranges {ranges[:8]!r} are not the plan's {planned[:8]!r} "
                           f"(T = {planned[-1][1]} tokens)")
    if not 1 <= split["micro_batches"] <= 64:
        raise ControlError(f"request header: micro_batches {split['micro_batches']} is not in [1, 64]")
    if split["codec"] != plan.codec:
        raise ControlError(f"request header: codec {split['codec'][:40]!r} is not the plan's {plan.codec!r}")
    for part in parts:
        if not isinstance(part, dict) or len(part) > 8 or not all(
                isinstance(spec, list) and len(spec) in (2, 3) and isinstance(spec[0], list) and len(spec[0]) <= 6
                and all(type(n) is int and 0 <= n < 1 << 31 for n in spec[0]) and spec[1] in _PART_DTYPES
                and (len(spec) == 2 or _levels_table(spec[2])) for spec in part.values()):
            raise ControlError(f"request header: a part {str(part)[:120]!r} is not named tensor shapes and dtypes")


def _levels_table(shape: object) -> bool:
    """A levels-form part's table (partition/scatter.py): [channels, levels], at most 256 levels."""
    return (isinstance(shape, list) and len(shape) == 2 and all(type(n) is int for n in shape)
            and 1 <= shape[0] <= 64 and 1 <= shape[1] <= MAX_LEVELS)


def encode_control(message: dict) -> bytes:
    body = json.dumps(validate_control(message), separators=(",", ":")).encode()
    if len(body) > MAX_CONTROL_BYTES:
        raise ValueError(f"control message of {len(body)} bytes exceeds the {MAX_CONTROL_BYTES}-byte bound")
    return body


def decode_control(key: bytes, channel: bytes, sequence: int, blob: bytes) -> dict:
    """Check size and MAC first, then parse and validate."""
    try:
        body = open_sealed(key, channel, sequence, blob, MAX_CONTROL_BYTES)
    except AuthError as err:
        raise ControlError(str(err)) from None
    try:
        message = json.loads(body.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ControlError(f"control message {sequence} is not JSON: {err}") from None
    return validate_control(message)


@dataclass
class Session:
    """One admitted worker process: its rank, its join slot (names its mailbox) and its session key."""

    rank: int
    slot: int
    key: bytes
    sequence: int = 0
    boot_nonce: bytes = b""
    """Rank 0's boot nonce this session was admitted under (lane keys derive from it)."""

    @property
    def channel(self) -> bytes:
        return f"ctl/{self.slot}".encode()

    def key_of(self, sequence: int) -> str:
        return f"ctl/{self.slot}/{sequence}"


def post_report(store, session: Session, name: str, message: dict) -> None:
    """Worker: a report to rank 0 at `{name}/{slot}`, sealed with the session key on channel `name` (the
    report's op; a later report of the same name replaces an unread one)."""
    store.set(f"{name}/{session.slot}", seal(session.key, name.encode(), session.slot, encode_control(message)))


def take_sealed(store, key: str, session: Session, channel: bytes, sequence: int) -> dict | None:
    """The message sealed with the session's key on `channel` at `sequence` that waits at `key`, read once (the
    key is deleted); None when there is none. ControlError when it does not open or fit the schema."""
    if not store.check([key]):
        return None
    blob = store.get(key)
    store.delete_key(key)
    return decode_control(session.key, channel, sequence, blob)


def take_reports(store, sessions: dict[int, Session], name: str) -> list[tuple[int, dict]]:
    """Rank 0: (rank, message) of each admitted session's `name` report since the last call, each read once;
    one that does not open or fit the schema is logged and dropped (a stranger on the store speaks for no one)."""
    found = []
    for rank, session in sorted(sessions.items()):
        try:
            message = take_sealed(store, f"{name}/{session.slot}", session, name.encode(), session.slot)
        except ControlError as err:
            log.warning("a %s report for rank %d's session was refused: %s", name, rank, err)
            continue
        if message is not None:
            found.append((rank, message))
    return found


class ControlChannel:
    """Rank 0's side: post sealed messages to the admitted workers' mailboxes."""

    def __init__(self, store, link=None) -> None:
        self.store = store
        self.link = link
        self.sessions: dict[int, Session] = {}
        self.stats = ExchangeStats()

    def post(self, rank: int, message: dict) -> None:
        session = self.sessions[rank]
        body = encode_control(message)
        delay_s = self.link.before_collective(len(body), 1) if self.link is not None else 0.0
        start = time.perf_counter()
        self.store.set(session.key_of(session.sequence), seal(session.key, session.channel, session.sequence, body))
        session.sequence += 1
        self.stats.add("control", sent=len(body), received=0, staging_s=0.0,
                       collective_s=time.perf_counter() - start, delay_s=delay_s)

    def broadcast_json(self, message: dict, ranks=None) -> dict:
        """Post `message` to every admitted worker (or to `ranks`); returns it (the Exchanger's shape)."""
        for rank in sorted(self.sessions if ranks is None else ranks):
            if rank in self.sessions:
                self.post(rank, message)
        return message


class Mailbox:
    """A worker's side: the next message from rank 0, authenticated and validated."""

    def __init__(self, store, session: Session) -> None:
        self.store = store
        self.session = session
        self.refused = 0

    def receive(self, timeout_s: float) -> dict:
        """The next message. One that fails authentication is logged, dropped and waited past (someone
        who reaches the store can delay this worker, but not drive it); one that was deleted or overwritten
        before we read it is skipped once a later one is there (it fails authentication at any other
        sequence number, so skipping ahead never lets a message be replayed)."""
        session = self.session
        deadline = time.monotonic() + timeout_s
        while True:
            key = session.key_of(session.sequence)
            remaining_s = deadline - time.monotonic()
            try:
                self.store.wait([key], timedelta(seconds=max(min(remaining_s, LOOKAHEAD_S), 1e-3)))
            except RuntimeError:  # DistStoreError: not there yet
                if remaining_s <= LOOKAHEAD_S:
                    raise
                self._skip_lost()
                continue
            blob = self.store.get(key)
            self.store.delete_key(key)
            try:
                message = decode_control(session.key, session.channel, session.sequence, blob)
            except ControlError as err:
                log.warning("rank %d: dropped control message %d: %s", session.rank, session.sequence, err)
                self.refused += 1
                continue
            session.sequence += 1
            return message

    def _skip_lost(self) -> None:
        session = self.session
        for ahead in range(1, LOOKAHEAD + 1):
            if self.store.check([session.key_of(session.sequence + ahead)]):
                log.warning("rank %d: control message %d never arrived (deleted or overwritten on the store); "
                            "skipping to %d", session.rank, session.sequence, session.sequence + ahead)
                self.refused += 1
                session.sequence += ahead
                return


__all__ = [
    "SCHEMA",
    "ControlChannel",
    "ControlError",
    "Mailbox",
    "Session",
    "decode_control",
    "encode_control",
    "post_report",
    "take_reports",
    "take_sealed",
    "validate_control",
    "validate_split",
]
