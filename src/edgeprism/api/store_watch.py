"""A watch on the coordinator's rendezvous store, for /metrics: does a fresh client still get an answer, and how fast?

torch's `TCPStore` answers every client and has no way to refuse one or cap what it holds
(docs/SECURITY.md), so a stranger on the network can flood it. Devices meet the store at every join and
every epoch (lane rendezvous, control messages), so a store that stalls stalls the cluster's repairs even
while requests already planned keep being served. The watch cannot stop a flood; it makes one visible:
every `interval_s` it connects a fresh client (as a joining device does) and asks for the number of keys.
/metrics shows the last round trip (`edgeprism_store_probe_seconds`, -1 when it failed), the probes that
failed or took longer than `stall_s` (`edgeprism_store_stalls`), the keys the store holds
(`edgeprism_store_keys`: a flood of keys), and this process's resident memory
(`edgeprism_process_rss_bytes`: a flood of large values lands in rank 0's memory, where the store lives).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger(__name__)


def probe_store(host: str, port: int, timeout_s: float = 5.0) -> tuple[float, int] | None:
    """(seconds, keys): connect a fresh client to the store and count its keys; None when that failed in `timeout_s`."""
    start = time.perf_counter()
    try:
        client = dist.TCPStore(host, port, None, False, timedelta(seconds=timeout_s))
        keys = client.num_keys()
    except (RuntimeError, OSError, ValueError) as err:  # torch's DistStoreError is a RuntimeError
        log.debug("store probe of %s:%d failed: %s", host, port, err)
        return None
    seconds = time.perf_counter() - start
    del client
    return seconds, int(keys)


def rss_bytes() -> int:
    """This process's resident memory in bytes (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class StoreWatch:
    """Probe the store at `address` ("HOST:PORT") every `interval_s` on a daemon thread (`start`/`stop`); a
    probe that fails or takes longer than `stall_s` is a stall, logged once per episode and counted."""

    def __init__(self, address: str, interval_s: float = 5.0, stall_s: float = 1.0, timeout_s: float = 5.0) -> None:
        if not (interval_s > 0 and stall_s > 0 and timeout_s > 0):
            raise ValueError(f"interval_s {interval_s}, stall_s {stall_s} and timeout_s {timeout_s} must be > 0")
        host, _, port = address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.interval_s, self.stall_s, self.timeout_s = interval_s, stall_s, timeout_s
        self.last_s: float | None = None
        """Seconds of the last probe; None before the first and after a failed one."""
        self.keys = 0
        self.stalls = 0
        self.probes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stalled = False

    def probe_once(self) -> None:
        found = probe_store(self.host, self.port, self.timeout_s)
        self.probes += 1
        self.last_s = None if found is None else found[0]
        if found is not None:
            self.keys = found[1]
        stalled = found is None or found[0] > self.stall_s
        if stalled:
            self.stalls += 1
            if not self._stalled:
                log.warning("the rendezvous store at %s:%d %s: is someone flooding it? (docs/SECURITY.md)",
                            self.host, self.port, "did not answer a fresh client within "
                            f"{self.timeout_s:.0f} s" if found is None else f"took {found[0]:.2f} s to answer")
        elif self._stalled:
            log.warning("the rendezvous store at %s:%d answers again (%.3f s)", self.host, self.port, found[0])
        self._stalled = stalled

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self.probe_once()

        self._thread = threading.Thread(target=loop, name="edgeprism-store-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def gauges(self) -> dict[str, tuple[str, float]]:
        return {
            "edgeprism_store_probe_seconds": ("Round trip of a fresh client to the rendezvous store at the last probe "
                                              "(-1: it did not answer).", -1.0 if self.last_s is None else self.last_s),
            "edgeprism_store_stalls": ("Store probes that failed or took longer than the stall bound.", self.stalls),
            "edgeprism_store_keys": ("Keys the rendezvous store held at the last probe.", self.keys),
            "edgeprism_process_rss_bytes": ("Resident memory of the coordinator process (the store lives in it).",
                                            rss_bytes()),
        }


__all__ = ["StoreWatch", "probe_store", "rss_bytes"]
