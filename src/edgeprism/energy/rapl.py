"""CPU energy from Linux RAPL through the powercap sysfs interface.

Layout (Linux Documentation/power/powercap/powercap.rst), one directory per zone:
`/sys/class/powercap/intel-rapl:<P>/` (package P) and `intel-rapl:<P>:<S>/` (its subzones: core,
uncore, dram), each with `name`, `energy_uj` (cumulative µJ) and `max_energy_range_uj` (where
`energy_uj` wraps to 0). AMD Zen CPUs expose the same `intel-rapl` zones on recent kernels.

The window's energy is the sum of the package zones plus any dram zones (DRAM is not inside the
package domain). `psys` (whole platform, on some laptops) overlaps the packages, so it is reported
in `parts_j` and counted only when there is no package zone. `intel-rapl-mmio:*` duplicates the
package counter and is ignored.

Since Linux 5.10 `energy_uj` is readable by root only (CVE-2020-8694, "PLATYPUS"), hence the hint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeprism.energy.counter import CounterMeter
from edgeprism.energy.measurement import Clock, MeterNotFoundError
from edgeprism.energy.sysfs import ReadText, read_attr, read_int, read_text

READ_HINT = (
    "Since Linux 5.10 RAPL energy counters are readable by root only: run as root, or grant read "
    "access with: sudo chmod a+r /sys/class/powercap/intel-rapl:*/energy_uj "
    "/sys/class/powercap/intel-rapl:*:*/energy_uj"
)


@dataclass(frozen=True)
class RaplZone:
    """One RAPL counter. `label` is "package-0" for a package, "package-0/dram" for a subzone."""

    label: str
    path: Path
    max_energy_range_uj: int
    is_top: bool

    def read_energy_uj(self, reader: ReadText = read_text) -> int:
        return read_int(self.path / "energy_uj", reader, READ_HINT)


def _zone_ids(directory: Path) -> tuple[int, ...] | None:
    parts = directory.name.split(":")[1:]
    return tuple(int(p) for p in parts) if parts and all(p.isdigit() for p in parts) else None


def find_rapl_zones(sysfs_root: str | Path = "/sys", reader: ReadText = read_text) -> list[RaplZone]:
    """Every RAPL zone with an energy counter, packages before their subzones."""
    root = Path(sysfs_root) / "class" / "powercap"
    found: dict[tuple[int, ...], tuple[str, Path, int]] = {}
    for directory in root.glob("intel-rapl:*"):
        ids = _zone_ids(directory)
        if ids is None or not (directory / "energy_uj").exists():
            continue
        name = read_attr(directory / "name", reader, READ_HINT)
        max_range_uj = read_int(directory / "max_energy_range_uj", reader, READ_HINT)
        found[ids] = (name, directory, max_range_uj)
    zones = []
    for ids in sorted(found):
        name, directory, max_range_uj = found[ids]
        if len(ids) == 1:
            label = name
        else:
            parent = found[ids[:1]][0] if ids[:1] in found else f"intel-rapl:{ids[0]}"
            label = f"{parent}/{name}"
        zones.append(RaplZone(label, directory, max_range_uj, is_top=len(ids) == 1))
    return zones


def total_zone_labels(zones: list[RaplZone]) -> list[str]:
    """Which zones add up to the CPU's energy: packages and dram; psys only when no package exists."""
    labels = [z.label for z in zones if (z.is_top and z.label.startswith("package")) or z.label.endswith("dram")]
    if not any(label.startswith("package") for label in labels):
        labels = [z.label for z in zones if z.is_top]
    return labels


class RaplMeter(CounterMeter):
    """Metered CPU energy from RAPL counters (no sampling thread: the hardware integrates)."""

    def __init__(
        self,
        sysfs_root: str | Path = "/sys",
        *,
        clock: Clock = time.monotonic,
        sync: Callable[[], None] | None = None,
        reader: ReadText = read_text,
    ) -> None:
        root = Path(sysfs_root)
        zones = find_rapl_zones(root, reader)
        if not zones:
            raise MeterNotFoundError(
                f"no RAPL energy counters under {root}/class/powercap/intel-rapl:*/energy_uj. RAPL needs an "
                "Intel (Sandy Bridge or later) or AMD Zen CPU on bare metal (most VMs and containers on "
                "macOS/Windows hide it) and the powercap driver: sudo modprobe intel_rapl_msr"
            )
        self.zones = tuple(zones)
        self._reader = reader
        totals = total_zone_labels(zones)
        super().__init__(
            f"rapl:{'+'.join(totals)}",
            self.read_counters,
            totals,
            joules_per_count=1e-6,  # µJ
            wrap_ranges={z.label: z.max_energy_range_uj for z in zones},
            clock=clock,
            sync=sync,
        )
        self.read_counters()  # probe: the permission error surfaces now, with its hint

    def read_counters(self) -> dict[str, int]:
        return {zone.label: zone.read_energy_uj(self._reader) for zone in self.zones}
