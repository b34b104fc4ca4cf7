"""Modelled energy: measured phase times × a documented power model per device kind.

Used where no power meter exists (this project's CI and testbed hosts). Every figure it makes is
labelled `source="modelled"` and `meter="model:<power model>"`; nothing here pretends to measure.

The model is a small state machine. A device spends each second of a window in one phase, and
draws that phase's whole-device power:

    compute  -> compute_w                 (running the model's layers)
    staging  -> staging_w                 (GPU<->CPU copies around each exchange)
    tx       -> idle_w + radio_tx_w       (waiting on the link while sending)
    rx       -> idle_w + radio_rx_w       (waiting on the link while receiving)
    network  -> idle_w + (radio_tx_w + radio_rx_w) / 2   (an all-gather: both directions)
    idle     -> idle_w                    (anything else in the window)

    energy_j = sum over phases of phase_s × phase power_w

Phases must not overlap. The numbers of each registered model, and where they come from, are in
its `sources` and in docs/ENERGY.md: they are estimates within published power budgets, to be
replaced by a calibration against a real meter where one exists.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from edgeprism.energy.measurement import Clock, Measurement, MeterIdentity, Source, WindowBook

logger = logging.getLogger(__name__)

PHASES = ("compute_s", "staging_s", "tx_s", "rx_s", "network_s", "idle_s")
"""The phase-time keys `modelled_parts_j` accepts, in seconds."""


@dataclass(frozen=True)
class PowerModel:
    """Power of one device kind in each phase, in W. `scope` says what the figures cover."""

    name: str
    idle_w: float
    """Whole-device power while idle (OS up, nothing running)."""
    compute_w: float
    """Whole-device power while running the model, under the device's power mode."""
    staging_w: float
    """Whole-device power while copying tensors between GPU and CPU memory (memory-bound)."""
    radio_tx_w: float
    """Power the network interface adds above idle while transmitting."""
    radio_rx_w: float
    """Power the network interface adds above idle while receiving."""
    scope: str
    """What the numbers cover, e.g. "Jetson module input (VDD_IN)" or "one CPU core"."""
    sources: tuple[str, ...]
    """Where each number comes from (datasheets, papers, forum measurements)."""

    def __post_init__(self) -> None:
        for field in ("idle_w", "compute_w", "staging_w", "radio_tx_w", "radio_rx_w"):
            if getattr(self, field) < 0:
                raise ValueError(f"power model {self.name!r}: {field} is {getattr(self, field)} W; must be >= 0")
        if self.compute_w < self.idle_w:
            raise ValueError(f"power model {self.name!r}: compute_w {self.compute_w} W is below idle_w {self.idle_w} W")

    def phase_power_w(self) -> dict[str, float]:
        """Whole-device power in each phase of `PHASES`, in W."""
        return {
            "compute_s": self.compute_w,
            "staging_s": self.staging_w,
            "tx_s": self.idle_w + self.radio_tx_w,
            "rx_s": self.idle_w + self.radio_rx_w,
            "network_s": self.idle_w + 0.5 * (self.radio_tx_w + self.radio_rx_w),
            "idle_s": self.idle_w,
        }

    def __str__(self) -> str:
        return (
            f"{self.name} ({self.scope}): idle {self.idle_w} W, compute {self.compute_w} W, "
            f"staging {self.staging_w} W, radio +{self.radio_tx_w} W tx / +{self.radio_rx_w} W rx"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> PowerModel:
        return cls(**{**data, "sources": tuple(data.get("sources", ()))})


_WIFI = (
    "Radio: Halperin et al., 'Demystifying 802.11n power consumption', HotPower 2010 — an Intel 5300 "
    "802.11n NIC draws about 1.3-2.1 W transmitting and 0.9-1.1 W receiving; we take +1.5 W tx and "
    "+1.0 W rx above idle for a 2x2 WiFi card."
)

POWER_MODELS: Mapping[str, PowerModel] = MappingProxyType({
    m.name: m
    for m in (
        PowerModel(
            name="jetson-orin-nano-15w",
            idle_w=4.0,
            compute_w=12.0,
            staging_w=6.5,
            radio_tx_w=1.5,
            radio_rx_w=1.0,
            scope="Jetson Orin Nano 8GB module input rail (VDD_IN), nvpmodel 15 W mode",
            sources=(
                "Budget: NVIDIA Jetson Orin Nano Series Data Sheet (DS-11105-001) — 7 W and 15 W module "
                "power modes; nvpmodel's 15 W mode caps the module, so sustained compute stays below 15 W. "
                "We take 12 W: GPU+CPU busy, under the cap with headroom for its transients.",
                "Idle: NVIDIA developer forum, 'Jetson Orin Nano 8GB - Lowest Theoretical Operating Power "
                "Consumption' (2025) reports VDD_IN 2.18 W after aggressive tuning (2 cores, low clocks, "
                "PCIe off); a stock 15 W image idles higher, we take 4.0 W.",
                "Staging: memory-bound copies with one CPU core busy and the GPU mostly idle: estimated "
                "midway between idle and compute, 6.5 W.",
                _WIFI,
            ),
        ),
        PowerModel(
            name="jetson-nano-5w",
            idle_w=1.5,
            compute_w=4.5,
            staging_w=2.8,
            radio_tx_w=1.5,
            radio_rx_w=1.0,
            scope="Jetson Nano 4GB module input rail (POM_5V_IN), nvpmodel 5 W mode",
            sources=(
                "Budget: NVIDIA Jetson Nano Data Sheet (DA-09366-001) — 5 W and 10 W (MAXN) module power "
                "modes; under the 5 W mode (2 cores) sustained compute is taken as 4.5 W.",
                "Idle: about 1.5 W at POM_5V_IN on a headless image (estimate; calibrate with the "
                "ina3221 meter). Staging: estimated between idle and compute.",
                _WIFI,
            ),
        ),
        PowerModel(
            name="laptop-cpu",
            idle_w=3.0,
            compute_w=15.0,
            staging_w=6.0,
            radio_tx_w=1.5,
            radio_rx_w=1.0,
            scope="laptop CPU package (what RAPL package-0 reports), 15 W U-series part",
            sources=(
                "Compute: Intel ARK — U-series mobile CPUs (e.g. Core i7-1165G7, i5-1235U) have a 15 W "
                "base power (PL1), the sustained all-core package power.",
                "Idle: package power of an idle U-series laptop is a few W (estimate: 3 W). Staging on a "
                "CPU-only device is an in-memory copy: one core busy, estimated 6 W.",
                _WIFI,
            ),
        ),
        PowerModel(
            name="generic-cpu-core",
            idle_w=0.5,
            compute_w=6.0,
            staging_w=4.0,
            radio_tx_w=1.5,
            radio_rx_w=1.0,
            scope="one busy CPU core with its share of the package (testbed ranks pinned to a core)",
            sources=(
                "Compute: package base power divided by core count for common parts, e.g. 65 W / 8 cores "
                "(desktop, ~8 W) and 205 W / 28 cores (server, ~7 W) per Intel ARK; we take 6 W per busy core.",
                "Idle: a core in a deep C-state draws well under 1 W; 0.5 W. Staging: a memcpy keeps the "
                "core busy at lower IPC; 4 W (estimate).",
                _WIFI,
            ),
        ),
    )
})


def get_power_model(name: str) -> PowerModel:
    if name not in POWER_MODELS:
        raise ValueError(f"unknown power model {name!r}; known: {sorted(POWER_MODELS)}")
    return POWER_MODELS[name]


def modelled_parts_j(power_model: PowerModel, phase_times: Mapping[str, float]) -> dict[str, float]:
    """Energy of each phase in J: {"compute_j": ..., ...} for the phases given (keys of `PHASES`)."""
    unknown = sorted(set(phase_times) - set(PHASES))
    if unknown:
        raise ValueError(f"unknown phase(s) {unknown}; phase times are keyed by {list(PHASES)}")
    power_w = power_model.phase_power_w()
    parts_j = {}
    for phase, seconds in phase_times.items():
        if seconds < 0:
            raise ValueError(f"phase {phase} lasted {seconds} s; phase times must be >= 0")
        parts_j[phase[: -len("_s")] + "_j"] = seconds * power_w[phase]
    return parts_j


def modelled_energy_j(power_model: PowerModel, phase_times: Mapping[str, float]) -> float:
    """Total modelled energy in J of disjoint phases (seconds keyed by `PHASES`). Pure."""
    return sum(modelled_parts_j(power_model, phase_times).values())


def modelled_measurement(
    name: str, power_model: PowerModel, phase_times: Mapping[str, float], duration_s: float | None = None
) -> Measurement:
    """A `Measurement` labelled "modelled". With `duration_s`, time not in any phase counts as idle."""
    phases = dict(phase_times)
    busy_s = sum(phases.values())
    if duration_s is not None:
        if busy_s > duration_s * (1 + 1e-6) + 1e-9:
            logger.warning(
                "window %s: phases add up to %.6g s but the window lasted %.6g s (overlapping phases?); "
                "no idle time counted", name, busy_s, duration_s,
            )
        phases["idle_s"] = phases.get("idle_s", 0.0) + max(0.0, duration_s - busy_s)
    parts_j = modelled_parts_j(power_model, phases)
    return Measurement(
        name=name,
        duration_s=duration_s if duration_s is not None else busy_s,
        energy_j=sum(parts_j.values()),
        source="modelled",
        meter=f"model:{power_model.name}",
        parts_j=parts_j,
    )


class ModelledMeter(MeterIdentity):
    """A `PowerMeter` that models energy from phase times reported while windows are open.

    The caller times its phases (as it does anyway for the staging/network/compute split) and
    reports each with `add_phase("compute_s", seconds)`; it counts in every open window. At
    `end_window` the rest of the window's wall time counts as idle.
    """

    _source: Source = "modelled"

    def __init__(
        self,
        power_model: PowerModel | str = "generic-cpu-core",
        *,
        clock: Clock = time.monotonic,
        sync: Callable[[], None] | None = None,
    ) -> None:
        self.power_model = get_power_model(power_model) if isinstance(power_model, str) else power_model
        self._book = WindowBook(clock, sync)

    @property
    def name(self) -> str:
        return f"model:{self.power_model.name}"

    def begin_window(self, name: str) -> None:
        self._book.open(name, self._book.now(), dict.fromkeys(PHASES[:-1], 0.0))

    def add_phase(self, phase: str, seconds: float) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; phases are {list(PHASES)}")
        if seconds < 0:
            raise ValueError(f"phase {phase} lasted {seconds} s; phase times must be >= 0")
        for window in self._book.names:
            phases = self._book.peek(window)[1]
            phases[phase] = phases.get(phase, 0.0) + seconds  # type: ignore[index,union-attr]

    def end_window(self, name: str) -> Measurement:
        start_s, phases = self._book.peek(name)
        duration_s = self._book.now() - start_s
        self._book.close(name)
        return modelled_measurement(name, self.power_model, phases, duration_s)  # type: ignore[arg-type]

    def close(self) -> None:
        self._book.clear()
