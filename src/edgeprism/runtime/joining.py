"""A worker's side of membership (`runtime/membership.py` is rank 0's): asking to be admitted, saying who
this process is, acknowledging a liveness round and leaving on purpose, all through the rendezvous store
under the keys that module's docstring lists."""

from __future__ import annotations

import json
import os
from datetime import timedelta

from edgeprism.comm.auth import NONCE_BYTES, AuthError, encode_join, seal, session_key
from edgeprism.runtime.control import ControlError, Session, decode_control, encode_control

UNAUTHENTICATED = b"UNAUTHENTICATED"
"""Rank 0's reply to a join it could not authenticate (the requester holds no key to check a sealed reply)."""
_NO_SECRET = b"edgeprism-no-secret"  # the key when no secret is configured (a warning says so)
MAX_INFO_BYTES = 2048


def admission_key(secret: bytes | None) -> bytes:
    return secret if secret else _NO_SECRET


def join_cluster(store, secret: bytes | None, rank: int, digests: dict[str, bytes], timeout_s: float,
                 info: dict | None = None) -> Session:
    """Ask rank 0 to admit this process as `rank` (0: any free rank); returns the session, whose `rank` is
    the one given. `info`: what this process is (`describe_self`), told before asking, so that rank 0 can
    check it against a profile's devices. AuthError when rank 0 (or this process) fails authentication;
    ValueError with rank 0's reason when it refuses us."""
    key = admission_key(secret)
    store.wait(["auth/boot"], timedelta(seconds=timeout_s))
    boot_nonce = store.get("auth/boot")
    slot = store.add("join/slots", 1)
    nonce = os.urandom(NONCE_BYTES)
    if info is not None:
        describe_self(store, Session(rank, slot, session_key(key, boot_nonce, slot, nonce)), info)
    store.set(f"join/{slot}", encode_join(key, boot_nonce, slot, rank, nonce, b"".join(digests.values())))
    store.wait([f"join/{slot}/reply"], timedelta(seconds=timeout_s))
    blob = store.get(f"join/{slot}/reply")
    store.delete_key(f"join/{slot}/reply")
    if blob == UNAUTHENTICATED:
        raise AuthError(f"rank 0 refused rank {rank}'s join: this process does not hold the cluster's secret")
    session = Session(rank, slot, session_key(key, boot_nonce, slot, nonce), boot_nonce=boot_nonce)
    try:
        message = decode_control(session.key, b"admit", slot, blob)
    except ControlError as err:
        raise AuthError(f"the admission reply failed authentication; the process hosting the store is not this "
                        f"cluster's rank 0 ({err})") from None
    if message["op"] == "refused":
        raise ValueError(message["reason"])
    if message["op"] != "admitted" or rank not in (0, message["rank"]) or message["rank"] < 1:
        raise ControlError(f"unexpected admission reply {message} to a join as rank {rank}")
    session.rank = message["rank"]
    return session


def describe_self(store, session: Session, info: dict) -> None:
    """Tell rank 0 who this process is (host, device, cores: shown by `edgeprism cluster status`)."""
    body = json.dumps(info, separators=(",", ":")).encode()[:MAX_INFO_BYTES]
    store.set(f"info/{session.slot}", seal(session.key, b"info", session.slot, body))


def announce_leave(store, session: Session) -> None:
    """Tell rank 0 this process is leaving on purpose; it plans without us from its next request on."""
    store.set(f"leave/{session.slot}", seal(session.key, b"leave", session.slot,
                                            encode_control({"op": "leave"})))


def acknowledge(store, session: Session, epoch: int) -> None:
    store.set(f"ack/{epoch}/{session.rank}", seal(session.key, b"ack", epoch, encode_control({"op": "ping",
                                                                                           "epoch": epoch})))


__all__ = [
    "MAX_INFO_BYTES",
    "UNAUTHENTICATED",
    "acknowledge",
    "admission_key",
    "announce_leave",
    "describe_self",
    "join_cluster",
]
