"""Private data lanes: every payload a lane carries, sealed with ChaCha20-Poly1305 (an AEAD).

Key: one per lane and epoch, `lane_key(secret, boot nonce, epoch, ranks)` = HKDF-SHA256 of the cluster
secret, salted with rank 0's boot nonce, over the epoch number and the lane's ranks. Only processes that
hold the secret can derive it; a new coordinator (a new boot nonce) or a new epoch gives new keys.

Wire format of one sealed message (`OVERHEAD_BYTES` = 28 more than the payload):

    sender rank (4 B) | sender counter (8 B) | ciphertext (n B) | Poly1305 tag (16 B)

The 12-byte nonce is (sender's group rank, a counter the sender increments for every message it seals on
this lane), so no two messages under one key share a nonce. The associated data binds the message to its
kind ("layer", "scatter", "output", ...) and its sender. A receiver opens a message only from the rank it
expects, and only with a counter above the last one it took from that rank: a message that was altered,
forged without the key, replayed, reordered or sent as another kind or from another rank fails with
`TamperError` (a `PeerError`: the request is rerun on rank 0 and the sender dropped, see
edgeprism.runtime.rank0_side). A message sent to several receivers (an all-gather, a forward send) is
sealed once and its identical bytes go to each of them.

`cryptography` is imported when a lane is sealed, not at import (docs/SECURITY.md says what is and is not
covered).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

import torch
from torch import Tensor

from edgeprism.comm.auth import mac
from edgeprism.comm.exchange import PeerError

KEY_BYTES = 32
TAG_BYTES = 16
_NONCE = struct.Struct("!IQ")  # sender group rank, sender counter
NONCE_BYTES = _NONCE.size
OVERHEAD_BYTES = NONCE_BYTES + TAG_BYTES
"""What sealing adds to every message on the wire."""


class TamperError(PeerError):
    """A sealed lane message failed to open: altered, forged, replayed or misdirected. `src` is the sender's
    group rank on the lane (the peer at fault, or the link to it)."""

    def __init__(self, message: str, src: int) -> None:
        super().__init__(message)
        self.src = src


def _hkdf(secret: bytes, salt: bytes, info: bytes) -> bytes:
    try:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    except ImportError as err:  # a dependency of the package; only a broken install lacks it
        raise RuntimeError("sealed data lanes need the `cryptography` package: pip install edgeprism "
                           "(or pip install 'cryptography>=42')") from err
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(secret)


def lane_key(secret: bytes, boot_nonce: bytes, epoch: int, ranks: tuple[int, ...]) -> bytes:
    """The AEAD key of one lane in one epoch (every member derives the same; nobody else can)."""
    info = b"edgeprism lane v1|" + struct.pack("!q", epoch) + b"|" + ",".join(map(str, ranks)).encode()
    return _hkdf(secret, boot_nonce, info)


def lane_store_tag(secret: bytes, boot_nonce: bytes, epoch: int) -> str:
    """A name part for an epoch's lane rendezvous keys in the store that only members can compute, so that a
    stranger on the store cannot write a lane's addresses before its members do (16 hex digits)."""
    return mac(secret, b"lane-store", boot_nonce, struct.pack("!q", epoch)).hex()[:16]


def is_loopback(address: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; False for anything else, and for None (the lanes then
    listen where torch picks, which is not loopback on a device)."""
    if address is None:
        return False
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def lanes_sealed(setting: str, has_secret: bool, bind_addr: str | None) -> bool:
    """Whether a cluster seals its lanes: `setting` on / off, or auto (on unless the lanes listen on loopback).
    ValueError for on without a cluster secret (there would be no key only members hold)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"seal_lanes {setting!r} must be one of auto, on, off")
    if setting == "on" and not has_secret:
        raise ValueError("seal_lanes=on needs a cluster secret (EDGEPRISM_SECRET_FILE): the lane keys derive from it")
    if setting == "auto":
        return has_secret and not is_loopback(bind_addr)
    return setting == "on"


@dataclass
class LaneSealer:
    """Seals what this rank sends on one lane and opens what it receives (see the module docstring)."""

    key: bytes
    group_rank: int
    sent: int = 0
    """Counter of the last message this rank sealed on the lane."""
    last_seen: dict[int, int] = field(default_factory=dict)
    """Sender group rank → the counter of the last message taken from it."""

    overhead: int = OVERHEAD_BYTES
    """Bytes sealing adds to a message (the exchanger asks; it does not import this module)."""

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise ValueError(f"a lane key has {KEY_BYTES} bytes, got {len(self.key)}")
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        self._aead = ChaCha20Poly1305(self.key)

    @staticmethod
    def _aad(kind: str, src: int) -> bytes:
        return f"edgeprism lane|{kind}|{src}".encode()

    def seal(self, payload: Tensor, kind: str) -> Tensor:
        """A flat uint8 CPU tensor of `payload.numel() + OVERHEAD_BYTES` bytes."""
        self.sent += 1
        nonce = _NONCE.pack(self.group_rank, self.sent)
        data = payload.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()
        sealed = nonce + self._aead.encrypt(nonce, data, self._aad(kind, self.group_rank))
        return torch.frombuffer(bytearray(sealed), dtype=torch.uint8)

    def open(self, blob: Tensor, src: int, kind: str) -> Tensor:
        """The payload of a message from group rank `src`, as a flat uint8 CPU tensor; TamperError if it
        does not open (wrong key, altered, replayed, from another rank or of another kind)."""
        data = blob.detach().contiguous().view(-1).cpu().numpy().tobytes()
        if len(data) < OVERHEAD_BYTES:
            raise TamperError(f"sealed {kind} message from lane rank {src} has {len(data)} bytes, fewer than the "
                              f"{OVERHEAD_BYTES} of a seal", src)
        sender, counter = _NONCE.unpack_from(data)
        last = self.last_seen.get(src, 0)
        if sender != src or counter <= last:
            raise TamperError(f"sealed {kind} message claims sender {sender} counter {counter}; expected sender "
                              f"{src} with a counter above {last} (replayed or misdirected)", src)
        from cryptography.exceptions import InvalidTag

        try:
            plain = self._aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], self._aad(kind, src))
        except InvalidTag:
            raise TamperError(f"sealed {kind} message {counter} from lane rank {src} ({len(data)} bytes) failed "
                              f"authentication: altered on the way, or sealed without this lane's key", src) from None
        self.last_seen[src] = counter
        return torch.frombuffer(bytearray(plain), dtype=torch.uint8) if plain else torch.empty(0, dtype=torch.uint8)


__all__ = [
    "OVERHEAD_BYTES",
    "LaneSealer",
    "TamperError",
    "is_loopback",
    "lane_key",
    "lane_store_tag",
    "lanes_sealed",
]
