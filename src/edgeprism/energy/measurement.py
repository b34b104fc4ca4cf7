"""Measurement windows: the value every meter returns, the meter seam, and the shared bookkeeping.

Like zeus's `ZeusMonitor`: `begin_window(name)` ... `end_window(name) -> Measurement`. Windows are
named, may overlap, and each is measured as if it had its own meter. Every `Measurement` says
whether its energy was **metered** (read from a power sensor or energy counter) or **modelled**
(computed from phase times and a documented `PowerModel`), and by which meter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Source = Literal["metered", "modelled"]
Clock = Callable[[], float]
"""A monotonic clock in seconds (default `time.monotonic`); tests inject a fake one."""


class MeterNotFoundError(ValueError):
    """A meter that was asked for is not on this host; the message says what was looked for and how to enable it."""


@dataclass(frozen=True)
class Measurement:
    """Energy of one named window.

    `parts_j` breaks the energy down: per rail or counter for metered figures (e.g. "VDD_IN",
    "VDD_CPU_GPU_CV", "package-0/dram"), per phase for modelled ones ("compute_j", "idle_j", ...).
    Parts are not necessarily additive (a Jetson's VDD_IN already contains its other rails);
    `energy_j` is the figure to use.
    """

    name: str
    duration_s: float
    energy_j: float
    source: Source
    meter: str
    """Which meter made it: "ina3221:VDD_IN", "rapl:package-0", "nvml:0", "model:jetson-orin-nano-15w"."""
    parts_j: Mapping[str, float] = field(default_factory=dict)

    @property
    def avg_power_w(self) -> float:
        return self.energy_j / self.duration_s if self.duration_s > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"{self.name}: {self.energy_j:.4g} J over {self.duration_s:.4g} s "
            f"({self.avg_power_w:.3g} W avg), {self.source} by {self.meter}"
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "duration_s": self.duration_s,
            "energy_j": self.energy_j,
            "source": self.source,
            "meter": self.meter,
            "parts_j": dict(self.parts_j),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Measurement:
        if data["source"] not in ("metered", "modelled"):
            raise ValueError(f"measurement source is {data['source']!r}; expected 'metered' or 'modelled'")
        return cls(
            name=str(data["name"]),
            duration_s=float(data["duration_s"]),
            energy_j=float(data["energy_j"]),
            source=data["source"],
            meter=str(data["meter"]),
            parts_j={str(k): float(v) for k, v in data.get("parts_j", {}).items()},
        )


@runtime_checkable
class PowerMeter(Protocol):
    """The seam at the power-hardware boundary. Implementations: INA3221, RAPL, NVML, zeus, modelled, fake."""

    @property
    def name(self) -> str:
        """What `Measurement.meter` will say, e.g. "ina3221:VDD_IN"."""
        ...

    @property
    def source(self) -> Source: ...

    def begin_window(self, name: str) -> None: ...

    def end_window(self, name: str) -> Measurement: ...

    def close(self) -> None:
        """Stop any sampling thread and release the device; open windows are dropped."""
        ...


class MeterIdentity:
    """What a `PowerMeter` says about itself, the same for every meter here: its `name` (set `_name`), its
    `source` (`_source`: "metered" unless a meter models its energy) and a repr of both. A base class of
    the meters, not part of the protocol."""

    _name: str
    _source: Source = "metered"

    @property
    def name(self) -> str:
        return self._name

    @property
    def source(self) -> Source:
        return self._source

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.source})"


class WindowBook:
    """Open-window bookkeeping shared by the meters: names, start times, and the per-window state.

    `sync` (e.g. `torch.cuda.synchronize`) runs before every clock read, so a window covers the
    device work queued before its end and none queued after its start.
    """

    def __init__(self, clock: Clock = time.monotonic, sync: Callable[[], None] | None = None) -> None:
        self._clock = clock
        self._sync = sync
        self._open: dict[str, tuple[float, object]] = {}

    def sync(self) -> None:
        if self._sync is not None:
            self._sync()

    def clock_s(self) -> float:
        """The clock without synchronizing (for background samples)."""
        return self._clock()

    def now(self) -> float:
        """Synchronize the device, then read the clock (for window edges)."""
        self.sync()
        return self._clock()

    def open(self, name: str, start_s: float, state: object = None) -> None:
        if name in self._open:
            raise ValueError(f"measurement window {name!r} is already open; end it before beginning it again")
        self._open[name] = (start_s, state)

    def close(self, name: str) -> tuple[float, object]:
        if name not in self._open:
            raise ValueError(f"no open measurement window {name!r}; open windows: {sorted(self._open) or 'none'}")
        return self._open.pop(name)

    def peek(self, name: str) -> tuple[float, object]:
        if name not in self._open:
            raise ValueError(f"no open measurement window {name!r}; open windows: {sorted(self._open) or 'none'}")
        return self._open[name]

    @property
    def names(self) -> list[str]:
        return list(self._open)

    def clear(self) -> None:
        self._open.clear()


def trapezoid_energy_j(times_s: Sequence[float], powers_w: Sequence[float]) -> float:
    """Integrate power samples over time with the trapezoidal rule (J = W·s)."""
    if len(times_s) != len(powers_w):
        raise ValueError(f"{len(times_s)} sample times but {len(powers_w)} power samples")
    energy_j = 0.0
    for i in range(1, len(times_s)):
        dt_s = times_s[i] - times_s[i - 1]
        assert dt_s >= 0, "sample times must be non-decreasing (monotonic clock)"
        energy_j += 0.5 * (powers_w[i] + powers_w[i - 1]) * dt_s
    return energy_j
