"""Jetson power rails from the on-module TI INA3221 monitors, read through sysfs.

Two driver layouts exist (both are discovered; boards with two chips, e.g. AGX Xavier, give six rails):

- NVIDIA's downstream IIO driver `ina3221x` (L4T 32.x: Jetson Nano, TX2, Xavier NX/AGX):
  `/sys/bus/i2c/drivers/ina3221x/<bus>-<addr>/iio:device<N>/`
  `rail_name_<k>` (k = 0, 1, 2), `in_power<k>_input` (mW), `in_current<k>_input` (mA),
  `in_voltage<k>_input` (mV).
- The mainline hwmon driver `ina3221` (L4T 34+ / JetPack 5-6: Jetson Orin):
  `/sys/bus/i2c/drivers/ina3221/<bus>-<addr>/hwmon/hwmon<N>/`
  `in<k>_label` (k = 1, 2, 3), `in<k>_input` bus voltage (mV), `curr<k>_input` (mA),
  `in<k>_enable`; power is computed here as mA × mV. `in7_label` ("sum of shunt voltages") has
  no current channel and is skipped. (Linux Documentation/hwmon/ina3221.rst)

The energy of a window is the integral of the module's *input* rail (VDD_IN on Xavier NX / Orin,
POM_5V_IN on Nano): the other rails are parts of it. Boards with no input rail (AGX Xavier, AGX
Orin) are totalled as the sum of their rails, with a warning and the rails named in the meter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgeprism.energy.measurement import Clock, MeterNotFoundError
from edgeprism.energy.sampling import SampledMeter
from edgeprism.energy.sysfs import ReadText, numbered, read_attr, read_int, read_text

logger = logging.getLogger(__name__)

INPUT_RAIL_NAMES = ("VDD_IN", "POM_5V_IN")
"""Rail names that carry the whole module's input power, in order of preference."""

UNCONNECTED_LABELS = ("NC", "")

READ_HINT = (
    "The INA3221 files are world-readable on a stock L4T image; if yours are not, run as root "
    "or make them readable: sudo chmod a+r /sys/bus/i2c/drivers/ina3221*/*/hwmon/hwmon*/* "
    "(ina3221 layout) or .../ina3221x/*/iio:device*/* (ina3221x layout)."
)


@dataclass(frozen=True)
class Ina3221Rail:
    """One INA3221 channel: its label and where its readings are."""

    name: str
    layout: Literal["ina3221x", "ina3221"]
    power_mw_path: Path | None
    """ina3221x only: power in mW, as the driver computes it."""
    current_ma_path: Path
    voltage_mv_path: Path

    def read_power_w(self, reader: ReadText = read_text) -> float:
        if self.power_mw_path is not None:
            return read_int(self.power_mw_path, reader, READ_HINT) / 1e3  # mW -> W
        current_ma = read_int(self.current_ma_path, reader, READ_HINT)
        voltage_mv = read_int(self.voltage_mv_path, reader, READ_HINT)
        return current_ma * voltage_mv / 1e6  # mA * mV = uW -> W


def _iio_rails(root: Path, reader: ReadText) -> list[Ina3221Rail]:
    rails = []
    for device in sorted(root.glob("bus/i2c/drivers/ina3221x/*/iio:device*")):
        for k, label_path in numbered(list(device.glob("rail_name_*")), "rail_name_", ""):
            power = device / f"in_power{k}_input"
            rails.append(
                Ina3221Rail(
                    name=read_attr(label_path, reader, READ_HINT),
                    layout="ina3221x",
                    power_mw_path=power if power.exists() else None,
                    current_ma_path=device / f"in_current{k}_input",
                    voltage_mv_path=device / f"in_voltage{k}_input",
                )
            )
    return rails


def _hwmon_rails(root: Path, reader: ReadText) -> list[Ina3221Rail]:
    rails = []
    for hwmon in sorted(root.glob("bus/i2c/drivers/ina3221/*/hwmon/hwmon*")):
        for k, label_path in numbered(list(hwmon.glob("in*_label")), "in", "_label"):
            current = hwmon / f"curr{k}_input"
            if not current.exists():  # in7_label: sum of shunt voltages, no power of its own
                continue
            enable = hwmon / f"in{k}_enable"
            if enable.exists() and read_attr(enable, reader, READ_HINT) == "0":
                continue
            rails.append(
                Ina3221Rail(
                    name=read_attr(label_path, reader, READ_HINT),
                    layout="ina3221",
                    power_mw_path=None,
                    current_ma_path=current,
                    voltage_mv_path=hwmon / f"in{k}_input",
                )
            )
    return rails


def find_ina3221_rails(sysfs_root: str | Path = "/sys", reader: ReadText = read_text) -> list[Ina3221Rail]:
    """Every connected INA3221 rail under `sysfs_root`, both layouts; names made unique."""
    root = Path(sysfs_root)
    rails = [r for r in _iio_rails(root, reader) + _hwmon_rails(root, reader) if r.name not in UNCONNECTED_LABELS]
    seen: dict[str, int] = {}
    unique = []
    for rail in rails:
        seen[rail.name] = seen.get(rail.name, 0) + 1
        if seen[rail.name] > 1:
            # two chips with the same label: keep both, the second one renamed
            rail = Ina3221Rail(f"{rail.name}#{seen[rail.name]}", rail.layout, rail.power_mw_path,
                               rail.current_ma_path, rail.voltage_mv_path)
        unique.append(rail)
    return unique


def pick_input_rail(rail_names: Sequence[str], input_rail: str | None = None) -> str | None:
    """The rail that carries the whole module's power: `input_rail` if given, else a known input name."""
    if input_rail is not None:
        if input_rail not in rail_names:
            raise ValueError(f"input_rail={input_rail!r} is not among the INA3221 rails {list(rail_names)}")
        return input_rail
    return next((name for name in INPUT_RAIL_NAMES if name in rail_names), None)


class Ina3221Meter(SampledMeter):
    """Metered energy of a Jetson module: the input rail sampled every `period_s` and integrated.

    Construction discovers the rails and takes one reading, so a missing or unreadable meter
    fails here, not in the middle of a run.
    """

    def __init__(
        self,
        sysfs_root: str | Path = "/sys",
        *,
        input_rail: str | None = None,
        period_s: float = 0.02,
        clock: Clock = time.monotonic,
        background: bool = True,
        sync: Callable[[], None] | None = None,
        reader: ReadText = read_text,
    ) -> None:
        root = Path(sysfs_root)
        rails = find_ina3221_rails(root, reader)
        if not rails:
            raise MeterNotFoundError(
                f"no INA3221 power rails under {root}: looked for "
                f"{root}/bus/i2c/drivers/ina3221x/*/iio:device*/rail_name_* and "
                f"{root}/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in*_label. They exist on Jetson boards "
                "running NVIDIA's L4T kernel; inside a container, mount the host's /sys (docker run -v /sys:/sys:ro)."
            )
        self.rails = tuple(rails)
        names = [rail.name for rail in rails]
        chosen = pick_input_rail(names, input_rail)
        if chosen is not None:
            total_rails: tuple[str, ...] = (chosen,)
            meter_name = f"ina3221:{chosen}"
        else:
            total_rails = tuple(names)
            meter_name = f"ina3221:sum({'+'.join(names)})"
            logger.warning(
                "no INA3221 input rail (%s) among %s; energy is the sum of these rails and misses any "
                "unmonitored supply; pass input_rail= to choose one", "/".join(INPUT_RAIL_NAMES), names,
            )
        self._reader = reader
        super().__init__(meter_name, self.read_power_w, total_rails, period_s=period_s, clock=clock,
                         background=background, sync=sync)
        self.read_power_w()  # probe: permission and format errors surface now

    def read_power_w(self) -> dict[str, float]:
        return {rail.name: rail.read_power_w(self._reader) for rail in self.rails}
