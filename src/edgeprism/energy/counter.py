"""Meters built from cumulative energy counters (RAPL, NVML's total-energy counter).

A window reads every counter at its start and at its end; the energy is the difference. A counter
that wrapped once (end < start) adds its range back. A window longer than one full wrap period
cannot be told apart from a shorter one — RAPL's range is about 262 kJ per package (over an hour
at 60 W), far longer than any request — so that case is documented, not handled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from edgeprism.energy.measurement import Clock, Measurement, MeterIdentity, WindowBook

ReadCounters = Callable[[], dict[str, int]]
"""Returns every counter's raw value now (integer counts), keyed by part name."""


def counter_delta(start: int, end: int, wrap_range: int | None) -> int:
    """end - start for a counter that wraps to 0 after `wrap_range` counts (at most one wrap)."""
    if end >= start:
        return end - start
    if wrap_range is None:
        raise ValueError(f"energy counter went backwards ({start} -> {end}) and has no known wrap range")
    return end + wrap_range - start


class CounterMeter(MeterIdentity):
    """A `PowerMeter` over energy counters.

    joules_per_count: 1e-6 for RAPL's µJ, 1e-3 for NVML's mJ.
    total_parts: the counters whose deltas add up to `Measurement.energy_j`.
    wrap_ranges: per counter, the value at which it wraps (RAPL's max_energy_range_uj).
    """

    def __init__(
        self,
        name: str,
        read_counters: ReadCounters,
        total_parts: Sequence[str],
        *,
        joules_per_count: float,
        wrap_ranges: Mapping[str, int] | None = None,
        clock: Clock = time.monotonic,
        sync: Callable[[], None] | None = None,
    ) -> None:
        if not total_parts:
            raise ValueError(f"meter {name!r} needs at least one counter to total")
        self._name = name
        self._read_counters = read_counters
        self.total_parts = tuple(total_parts)
        self.joules_per_count = joules_per_count
        self.wrap_ranges = dict(wrap_ranges or {})
        self._book = WindowBook(clock, sync)

    def begin_window(self, name: str) -> None:
        if name in self._book.names:
            self._book.open(name, 0.0)  # raises: already open
        start_s = self._book.now()
        self._book.open(name, start_s, self._read_counters())

    def end_window(self, name: str) -> Measurement:
        start_s, start_counts = self._book.peek(name)
        end_s = self._book.now()
        end_counts = self._read_counters()
        self._book.close(name)
        parts_j = {
            part: counter_delta(start, end_counts[part], self.wrap_ranges.get(part)) * self.joules_per_count
            for part, start in start_counts.items()  # type: ignore[union-attr]
        }
        return Measurement(
            name=name,
            duration_s=end_s - start_s,
            energy_j=sum(parts_j[part] for part in self.total_parts),
            source="metered",
            meter=self._name,
            parts_j=parts_j,
        )

    def close(self) -> None:
        self._book.clear()
