"""Exchanges that run while the caller computes: one daemon thread per exchanger and the handle a caller waits on.

`Exchanger.start_all_gather_bytes` (comm/exchange.py) stages its payload on the caller's thread, then hands the
(emulated) link and the collective to a `BackgroundThread` and returns a `PendingExchange`; the loopback fake
(comm/loopback.py) returns the same handle.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from torch import Tensor


class PendingExchange:
    """An exchange in flight (`Exchanger.start_all_gather_bytes`): `wait()` blocks until it is done and returns
    what the blocking call would have; the seconds it blocked are `waited_s`."""

    def __init__(self, finish: Callable[[], list[Tensor]]) -> None:
        self._finish = finish
        self.waited_s = 0.0

    def wait(self) -> list[Tensor]:
        start = time.perf_counter()
        try:
            return self._finish()
        finally:
            self.waited_s = time.perf_counter() - start


class BackgroundThread:
    """One daemon thread that runs an exchange's emulated delay and collective while the caller computes, jobs in
    the order submitted. (Daemon: a collective stuck without a deadline must not keep the process from exiting.)"""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="edgeprism-exchange", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, future = job
            try:
                future.set_result(fn())
            except BaseException as err:  # handed to the waiting caller
                future.set_exception(err)
            # Drop the finished job before waiting for the next: its gather holds the exchanger, and with it the
            # lane's process group, which would otherwise outlive the lane's retirement (its sockets, threads
            # and buffers leaked once per broken epoch).
            del job, fn, future

    def submit(self, fn: Callable) -> Future:
        future: Future = Future()
        self._jobs.put((fn, future))
        return future

    def close(self) -> None:
        """End the thread once the jobs already submitted are done (it holds nothing afterwards)."""
        self._jobs.put(None)
