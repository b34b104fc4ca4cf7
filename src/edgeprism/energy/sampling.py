"""Meters built from a power reading (W) and a clock: sample, then integrate over each window.

Used where the hardware gives instantaneous power rather than an energy counter (INA3221 rails,
NVML on GPUs without the total-energy counter). While any window is open a small daemon thread
takes a sample every `period_s`; `begin_window`/`end_window` take one more sample at each edge,
so a window shorter than the period still gets two samples. Energy is the trapezoidal integral
of the samples between the window's edges, per rail.

For tests, `background=False` turns the thread off: the test drives `sample()` itself with a fake
clock and a fake reading, so nothing depends on sleeping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from edgeprism.energy.measurement import Clock, Measurement, MeterIdentity, WindowBook, trapezoid_energy_j

logger = logging.getLogger(__name__)

ReadPowerW = Callable[[], dict[str, float]]
"""Returns the power of every rail now, in W, keyed by rail name."""


class SampledMeter(MeterIdentity):
    """A `PowerMeter` that integrates sampled power.

    read_power_w: one reading of every rail, in W.
    total_rails: the rails whose integrals add up to `Measurement.energy_j` (the rest are reported
        in `parts_j` only, e.g. sub-rails already contained in a Jetson's VDD_IN).
    period_s: background sampling period (default 20 ms; the INA3221 on Jetson updates about every
        few ms, so 20 ms loses little while costing a core almost nothing).
    """

    def __init__(
        self,
        name: str,
        read_power_w: ReadPowerW,
        total_rails: Sequence[str],
        *,
        period_s: float = 0.02,
        clock: Clock = time.monotonic,
        background: bool = True,
        sync: Callable[[], None] | None = None,
    ) -> None:
        if period_s <= 0:
            raise ValueError(f"sampling period_s is {period_s}; it must be > 0")
        if not total_rails:
            raise ValueError(f"meter {name!r} needs at least one rail to total")
        self._name = name
        self._read_power_w = read_power_w
        self.total_rails = tuple(total_rails)
        self.period_s = period_s
        self._background = background
        self._book = WindowBook(clock, sync)
        self._lock = threading.Lock()
        self._times_s: list[float] = []
        self._powers_w: list[dict[str, float]] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._thread_error: BaseException | None = None

    def sample(self, *, at_edge: bool = False) -> int:
        """Take one sample now; returns its index. Clock and reading happen under one lock so
        samples from the thread and from the window edges stay in time order. A window edge first
        synchronizes the device (outside the lock: it may wait); background samples never do."""
        if at_edge:
            self._book.sync()
        with self._lock:
            t_s = self._book.clock_s()
            powers_w = self._read_power_w()
            self._times_s.append(t_s)
            self._powers_w.append(powers_w)
            return len(self._times_s) - 1

    def begin_window(self, name: str) -> None:
        if name in self._book.names:
            self._book.open(name, 0.0)  # raises: already open
        if not self._book.names:
            with self._lock:
                # no window open: nothing needs the old samples
                self._times_s.clear()
                self._powers_w.clear()
        index = self.sample(at_edge=True)
        self._book.open(name, self._times_s[index], index)
        if self._background and self._thread is None:
            self._start_thread()

    def end_window(self, name: str) -> Measurement:
        start_s, start_index = self._book.peek(name)
        end_index = self.sample(at_edge=True)
        self._book.close(name)
        if not self._book.names:
            self._stop_thread()
        if self._thread_error is not None:
            error, self._thread_error = self._thread_error, None
            raise RuntimeError(f"power sampling thread of {self._name} failed: {error}") from error
        with self._lock:
            times_s = self._times_s[start_index : end_index + 1]
            powers_w = self._powers_w[start_index : end_index + 1]
        rails = list(powers_w[0])
        parts_j = {rail: trapezoid_energy_j(times_s, [p[rail] for p in powers_w]) for rail in rails}
        return Measurement(
            name=name,
            duration_s=times_s[-1] - start_s,
            energy_j=sum(parts_j[rail] for rail in self.total_rails),
            source="metered",
            meter=self._name,
            parts_j=parts_j,
        )

    def close(self) -> None:
        self._book.clear()
        self._stop_thread()

    @property
    def num_samples(self) -> int:
        with self._lock:
            return len(self._times_s)

    # --- background thread ---

    def _start_thread(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"edgeprism-power-{self._name}", daemon=True)
        self._thread.start()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.sample()
            except BaseException as error:  # re-raised by end_window, not swallowed
                logger.error("power sampling of %s failed: %s", self._name, error)
                self._thread_error = error
                return
