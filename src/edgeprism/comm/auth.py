"""Cluster authentication: one shared secret, an HMAC-SHA256 join handshake, and sealed control messages.

Every rank of a cluster holds the same secret (`EDGEPRISM_SECRET_FILE`, a file of at least 16 bytes
readable by its owner only, or `EDGEPRISM_SECRET`; `launch_local` makes a fresh one per cluster).

Join (over the rendezvous store, see `edgeprism.runtime.membership`): rank 0 publishes a random boot
nonce; a joining worker takes a fresh slot number and writes a fixed-size binary request

    rank (4 B) | worker nonce (16 B) | start digests (3 x 32 B) | HMAC(secret, boot nonce, slot, all before)

Rank 0 checks the size, then the MAC (constant time), and only then looks at the fields; it answers with
a message sealed by HMAC(secret, "admit", boot nonce, slot, worker nonce), which the worker checks before
it reads it (so a worker is driven only by a rank 0 that holds the secret). Both sides then derive a
session key; every later control message is `HMAC(session key, channel, sequence number, body) | body`,
checked for size and MAC before the JSON body is parsed. Slot numbers and sequence numbers are used
once, so a recorded message cannot be replayed; a boot nonce per rank 0 keeps a recording from an
earlier cluster from being replayed into a new one.

The data lanes' tensors are sealed separately (edgeprism.comm.sealing, keys derived from the same secret).
What this does not cover (docs/SECURITY.md): anyone who reaches the store can still delay or deny
service.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import struct
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

SECRET_ENV = "EDGEPRISM_SECRET"
SECRET_FILE_ENV = "EDGEPRISM_SECRET_FILE"
MIN_SECRET_BYTES = 16
MAC_BYTES = 32
NONCE_BYTES = 16
DIGEST_BYTES = 32
NUM_DIGESTS = 3  # model config, weights fingerprint, profile (edgeprism.runtime.groups.start_digests)
_JOIN_HEAD = struct.Struct("!I")
JOIN_BYTES = _JOIN_HEAD.size + NONCE_BYTES + NUM_DIGESTS * DIGEST_BYTES + MAC_BYTES


class AuthError(RuntimeError):
    """A peer failed authentication: wrong or missing secret, a tampered, replayed or oversized message."""


def load_secret(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The cluster secret from `EDGEPRISM_SECRET_FILE` (preferred) or `EDGEPRISM_SECRET`; None if neither
    is set. ValueError for a secret that is too short or a file that cannot be read."""
    env = os.environ if environ is None else environ
    path = env.get(SECRET_FILE_ENV)
    if path:
        try:
            mode = os.stat(path).st_mode
            secret = Path(path).read_bytes().strip()
        except OSError as err:
            raise ValueError(f"cannot read the cluster secret from {SECRET_FILE_ENV}={path}: {err.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("cluster secret file %s is readable by others (mode %o); chmod 600 it", path, mode & 0o777)
        where = f"{SECRET_FILE_ENV}={path}"
    elif env.get(SECRET_ENV):
        secret, where = env[SECRET_ENV].encode(), SECRET_ENV
    else:
        return None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the cluster secret in {where} has {len(secret)} bytes; use at least {MIN_SECRET_BYTES} "
                         f"(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)")
    return secret


def new_secret() -> bytes:
    return secrets.token_hex(32).encode()


def write_secret_file(path: str | os.PathLike, secret: bytes) -> Path:
    """Write `secret` to a new file only its owner may read (fails if the file exists)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    return Path(path)


def mac(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over length-prefixed parts (so no two different part lists give the same input)."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        h.update(struct.pack("!Q", len(part)))
        h.update(part)
    return h.digest()


def _int(value: int) -> bytes:
    return struct.pack("!q", value)


def seal(key: bytes, channel: bytes, sequence: int, body: bytes) -> bytes:
    """MAC | body, bound to a channel name and a sequence number."""
    return mac(key, channel, _int(sequence), body) + body


def open_sealed(key: bytes, channel: bytes, sequence: int, blob: bytes, max_body_bytes: int) -> bytes:
    """The body of a sealed message, after checking its size and MAC; AuthError otherwise."""
    if not MAC_BYTES <= len(blob) <= MAC_BYTES + max_body_bytes:
        raise AuthError(f"message of {len(blob)} bytes on {channel.decode(errors='replace')} is outside "
                        f"{MAC_BYTES}..{MAC_BYTES + max_body_bytes} bytes")
    body = blob[MAC_BYTES:]
    if not hmac.compare_digest(blob[:MAC_BYTES], mac(key, channel, _int(sequence), body)):
        raise AuthError(f"message {sequence} on {channel.decode(errors='replace')} failed authentication (the "
                        f"sender does not hold this cluster's secret, or the message was altered or replayed)")
    return body


def encode_join(secret: bytes, boot_nonce: bytes, slot: int, rank: int, nonce: bytes, digests: bytes) -> bytes:
    assert len(nonce) == NONCE_BYTES and len(digests) == NUM_DIGESTS * DIGEST_BYTES, (len(nonce), len(digests))
    head = _JOIN_HEAD.pack(rank) + nonce + digests
    return head + mac(secret, b"join", boot_nonce, _int(slot), head)


def decode_join(secret: bytes, boot_nonce: bytes, slot: int, blob: bytes) -> tuple[int, bytes, bytes]:
    """(rank, worker nonce, digests) of a join request, checked by size and MAC before any field is read."""
    if len(blob) != JOIN_BYTES:
        raise AuthError(f"join request in slot {slot} has {len(blob)} bytes, not {JOIN_BYTES}")
    head, tag = blob[:-MAC_BYTES], blob[-MAC_BYTES:]
    if not hmac.compare_digest(tag, mac(secret, b"join", boot_nonce, _int(slot), head)):
        raise AuthError(f"join request in slot {slot} failed authentication: the joining process does not hold "
                        f"this cluster's secret ({SECRET_FILE_ENV})")
    (rank,) = _JOIN_HEAD.unpack_from(head)
    nonce = head[_JOIN_HEAD.size:_JOIN_HEAD.size + NONCE_BYTES]
    return rank, nonce, head[_JOIN_HEAD.size + NONCE_BYTES:]


def session_key(secret: bytes, boot_nonce: bytes, slot: int, nonce: bytes) -> bytes:
    return mac(secret, b"session", boot_nonce, _int(slot), nonce)


__all__ = [
    "JOIN_BYTES",
    "NONCE_BYTES",
    "SECRET_ENV",
    "SECRET_FILE_ENV",
    "AuthError",
    "decode_join",
    "encode_join",
    "load_secret",
    "mac",
    "new_secret",
    "open_sealed",
    "seal",
    "session_key",
    "write_secret_file",
]
