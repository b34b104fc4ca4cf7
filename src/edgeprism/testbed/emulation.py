"""The transport-side part of the emulated link: added latency and, without root, the rate limit.

This kernel has no netem, so the one-way delay of a link is added per message by the sender:
`EmulatedLink.before_collective(nbytes_sent, hops)` sleeps `delay_s * hops` right before each
collective (one `hops` per sequential message step of that collective). It sleeps, so it takes no
CPU from the emulated device (tests/test_testbed_emulation.py measures that). With the kernel
testbed ("kernel" mode) the rate is enforced by tbf qdiscs on the veth links; in the loopback
fallback ("transport" mode) a token bucket here enforces it too.

The link is described by a small JSON file named by `EDGEPRISM_LINK_FILE`:
`{"rate_bps": .., "delay_s": .., "mode": "kernel"|"transport", "preset": ..}`. It is re-read when
it changes, so a running job follows `Testbed.set_link`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from edgeprism.testbed.presets import LinkPreset, format_delay, format_rate

__all__ = ["LINK_FILE_ENV", "EmulatedLink", "LinkMode", "LinkState", "burst_bytes", "write_link_file"]

log = logging.getLogger(__name__)

LINK_FILE_ENV = "EDGEPRISM_LINK_FILE"

LinkMode = Literal["kernel", "transport"]


def burst_bytes(rate_bps: float) -> int:
    """Token-bucket depth used by both the kernel tbf and the transport bucket.

    One millisecond of traffic at the rate, but at least 32 KiB: a Linux tbf needs a bucket larger
    than one (GSO-segmented) packet plus timer slack, and 32 KiB keeps small control messages from
    ever waiting on the rate.
    """
    return max(32 * 1024, int(rate_bps / 8 * 1e-3))


@dataclasses.dataclass(frozen=True)
class LinkState:
    """What the link file says."""

    rate_bps: float
    delay_s: float
    mode: LinkMode
    preset: str

    def describe(self) -> str:
        if self.mode == "kernel":
            return f"kernel tbf {format_rate(self.rate_bps)} + transport delay {format_delay(self.delay_s)}"
        return (
            f"EMULATED on loopback: transport token bucket {format_rate(self.rate_bps)} + "
            f"transport delay {format_delay(self.delay_s)}"
        )


def write_link_file(path: str | os.PathLike[str], link: LinkPreset, mode: LinkMode) -> None:
    """Write (atomically, so readers never see half a file) the link file for `link`."""
    data = {"rate_bps": link.rate_bps, "delay_s": link.delay_s, "mode": mode, "preset": link.name}
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def _read_link_file(path: str) -> LinkState:
    with open(path) as fh:
        data = json.load(fh)
    mode = data.get("mode")
    if mode not in ("kernel", "transport"):
        raise ValueError(f"link file {path}: mode {mode!r} is not 'kernel' or 'transport'")
    rate_bps, delay_s = float(data["rate_bps"]), float(data["delay_s"])
    if rate_bps <= 0 or delay_s < 0:
        raise ValueError(f"link file {path}: rate_bps {rate_bps} must be > 0 and delay_s {delay_s} >= 0")
    return LinkState(rate_bps=rate_bps, delay_s=delay_s, mode=mode, preset=str(data.get("preset", "custom")))


class EmulatedLink:
    """Per-rank emulated link. One per process; not thread-safe (collectives are issued in order)."""

    def __init__(
        self,
        path: str,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._sleep = sleep
        self._clock = clock
        self._file_key: tuple[int, int, int] | None = None
        self._missing_warned = False
        self.state = self._reload()
        # Token bucket (transport mode): starts full.
        self._tokens_bytes = float(burst_bytes(self.state.rate_bps))
        self._stamp_s = clock()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> EmulatedLink | None:
        """The link named by `EDGEPRISM_LINK_FILE` in `environ`, or None when it is unset or empty."""
        environ = os.environ if environ is None else environ
        path = environ.get(LINK_FILE_ENV, "")
        if not path:
            return None
        if not os.path.exists(path):
            raise ValueError(
                f"{LINK_FILE_ENV}={path} names no file; start the testbed first (edgeprism testbed up) "
                f"or unset {LINK_FILE_ENV}"
            )
        return cls(path, **kwargs)

    def _stat_key(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _reload(self) -> LinkState:
        self._file_key = self._stat_key()
        return _read_link_file(self.path)

    def refresh(self) -> LinkState:
        """Re-read the link file if it changed since the last read; return the current state."""
        key = self._stat_key()
        if key is None:
            # The testbed went away under a running job: keep the last link rather than fail mid-request.
            if not self._missing_warned:
                log.warning("link file %s vanished; keeping the last link (%s)", self.path, self.state.describe())
                self._missing_warned = True
            return self.state
        if key != self._file_key:
            old = self.state
            self.state = self._reload()
            if self.state != old:
                log.info("link changed: %s -> %s", old.describe(), self.state.describe())
        return self.state

    def transport_wait_s(self, nbytes_sent: int) -> float:
        """Token-bucket wait for sending `nbytes_sent` now (transport mode), and take the tokens."""
        state = self.state
        rate_bytes_per_s = state.rate_bps / 8.0
        depth = float(burst_bytes(state.rate_bps))
        now = self._clock()
        self._tokens_bytes = min(depth, self._tokens_bytes + (now - self._stamp_s) * rate_bytes_per_s)
        self._tokens_bytes -= nbytes_sent
        self._stamp_s = now
        if self._tokens_bytes >= 0:
            return 0.0
        wait_s = -self._tokens_bytes / rate_bytes_per_s
        # The deficit is paid by waiting; the bucket is empty when the wait ends.
        self._tokens_bytes = 0.0
        self._stamp_s = now + wait_s
        return wait_s

    def before_collective(self, nbytes_sent: int, hops: int) -> float:
        """Sleep for this rank's share of the emulated link before a collective; return seconds slept.

        `nbytes_sent`: bytes this rank puts on its link in the collective; `hops`: sequential message
        steps (e.g. world_size - 1 for a ring all-gather). Adds `delay_s * hops`, plus in transport
        mode the token-bucket time for `nbytes_sent` at `rate_bps`.
        """
        assert nbytes_sent >= 0 and hops >= 0, (nbytes_sent, hops)
        state = self.refresh()
        wait_s = state.delay_s * hops
        if state.mode == "transport":
            wait_s += self.transport_wait_s(nbytes_sent)
        if wait_s > 0:
            self._sleep(wait_s)
        return wait_s

    def describe(self) -> str:
        return self.state.describe()
