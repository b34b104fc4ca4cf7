"""A fake `PowerMeter` for tests of code that takes a meter (profile/, runtime/, bench/)."""

from __future__ import annotations

import time

from edgeprism.energy.measurement import Clock, Measurement, MeterIdentity, Source, WindowBook


class FakeMeter(MeterIdentity):
    """Draws a constant `power_w` (default 10 W) over the clock's time; labelled as `source` says."""

    def __init__(self, power_w: float = 10.0, *, clock: Clock = time.monotonic, source: Source = "metered",
                 name: str = "fake") -> None:
        self.power_w = power_w
        self._source = source
        self._name = name
        self._book = WindowBook(clock)
        self.ended: list[Measurement] = []

    def begin_window(self, name: str) -> None:
        self._book.open(name, self._book.now())

    def end_window(self, name: str) -> Measurement:
        start_s, _ = self._book.peek(name)
        duration_s = self._book.now() - start_s
        self._book.close(name)
        measurement = Measurement(name, duration_s, self.power_w * duration_s, self._source, self._name)
        self.ended.append(measurement)
        return measurement

    def close(self) -> None:
        self._book.clear()
