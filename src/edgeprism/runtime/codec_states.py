"""The calibrated codecs' state files travel with the cluster spec.

A `tc:<digest>` codec (edgeprism.compress.calibrated) decodes only with its state file, which lives in the
calibration folder of the machine that fitted it. The coordinator publishes, beside the sealed spec, the
file of every `tc:` codec its profile lists, sealed with the cluster secret and bound to its boot nonce
and the codec's name (`codec/<name>`: 12 hex digits, as the profile names it; the body carries the full
64-digit digest, then the file). A device that joins installs each file it lacks into its own calibration
folder after checking the seal and that the content hashes to the digest
(`compress.calibrated_state.install_state`), before it loads the model; so a device never meets a codec it
cannot decode. A coordinator whose profile names a `tc:` codec it has no file for refuses to start
(ValueError naming the digest and where to copy the file from).

Unlike the spec these keys are not pinned (restored by rank 0 when someone on the store overwrites them):
that reads megabytes back on every join check (~10 ms a second per codec on loopback). An overwritten
state fails the joining device's seal check (AuthError), as a forged spec does.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgeprism.comm.auth import AuthError, open_sealed, seal
from edgeprism.compress.calibrated import NAME_PREFIX
from edgeprism.compress.calibrated_state import calibration_dir, install_state, load_calibrated, state_path
from edgeprism.profile.schema import Profile
from edgeprism.runtime.joining import admission_key

log = logging.getLogger(__name__)

CODEC_KEY = "codec/"
"""Store key prefix (under the coordinator's `edgeprism/`): `codec/tc:<12 hex>`."""
MAX_STATE_BYTES = 256 << 20
"""A state file holds a d x d basis per layer: ~3.6 MB for MiniLM (d = 384, 6 layers), ~29 MB for d = 768 x 12."""
DIGEST_HEX = 64


def calibrated_codecs(profile: Profile) -> list[str]:
    """Names of the profile's codecs that need a state file ("tc:<12 hex>"), in the profile's order."""
    return [c.codec for c in profile.codecs if c.codec.lower().startswith(NAME_PREFIX)]


def _channel(boot_nonce: bytes, name: str) -> bytes:
    return b"codec" + boot_nonce + name.encode()


def publish_codec_states(store, secret: bytes | None, boot_nonce: bytes, profile: Profile) -> list[str]:
    """Write the sealed state file of each `tc:` codec of `profile`; returns the store keys written.
    ValueError when this machine has no (or a changed) file for one of them."""
    published = []
    for name in calibrated_codecs(profile):
        path = state_path(name)  # ValueError naming the digest and how to copy the file
        load_calibrated(path)  # the content hashes to its name
        body = path.stem.encode() + path.read_bytes()
        if len(body) > MAX_STATE_BYTES:
            raise ValueError(f"codec {name}: state file {path} has {len(body)} bytes; a cluster ships at most "
                             f"{MAX_STATE_BYTES}")
        store.set(CODEC_KEY + name, seal(admission_key(secret), _channel(boot_nonce, name), 0, body))
        published.append(CODEC_KEY + name)
    return published


def install_codec_states(store, secret: bytes | None, profile: Profile, address: str) -> list[Path]:
    """On a device: the state file of each `tc:` codec of `profile` that this machine lacks, read from the
    coordinator's store (at `address`, for messages) and installed in `calibration_dir()`; returns the
    paths written. ValueError naming the digest when the coordinator does not publish one; AuthError when
    its seal does not verify."""
    written = []
    for name in calibrated_codecs(profile):
        try:
            load_calibrated(name)
            continue  # this machine already holds the same state
        except ValueError:
            pass
        key = CODEC_KEY + name
        if not store.check([key]):
            raise ValueError(f"the coordinator at {address} plans with codec {name} but does not ship its state file "
                             f"(an older edgeprism?): copy {name[len(NAME_PREFIX):]}*.safetensors from the "
                             f"coordinator's $EDGEPRISM_HOME/codecs (default ~/.cache/edgeprism/codecs) into "
                             f"{calibration_dir()} on this device")
        boot_nonce = store.get("auth/boot")
        try:
            body = open_sealed(admission_key(secret), _channel(boot_nonce, name), 0, store.get(key),
                               MAX_STATE_BYTES)
        except AuthError as err:
            raise AuthError(f"the state file of codec {name} failed authentication: {err}") from None
        digest = body[:DIGEST_HEX].decode(errors="replace")
        if not digest.startswith(name[len(NAME_PREFIX):].lower()):
            raise ValueError(f"the coordinator shipped state {digest[:12]!r} for codec {name}")
        written.append(install_state(digest, body[DIGEST_HEX:]))
        log.info("installed codec %s's state from the coordinator at %s: %s", name, address, written[-1])
    return written


__all__ = ["CODEC_KEY", "MAX_STATE_BYTES", "calibrated_codecs", "install_codec_states", "publish_codec_states"]
