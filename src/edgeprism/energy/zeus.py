"""Energy through zeus's `ZeusMonitor`, for hosts where zeus reaches what the other meters cannot.

zeus (ml.energy, `pip install zeus`) measures NVIDIA and AMD GPUs and RAPL CPUs, and reads RAPL
through its privileged daemon `zeusd` so an unprivileged process need not chmod sysfs. Where the
plain RAPL/NVML meters work they are equivalent; this adapter adds AMD GPUs and `zeusd`. Only built
when asked for explicitly (`detect_meter("zeus")`); `zeus` is imported then, not before.

The window's energy is the sum of what zeus reports for the GPUs, CPU packages and DRAM it
monitors; each appears in `parts_j` ("gpu0", "cpu0", "dram0").
"""

from __future__ import annotations

from types import ModuleType

from edgeprism.energy.measurement import Measurement, MeterIdentity, MeterNotFoundError


def import_zeus_monitor() -> ModuleType:
    try:
        import zeus.monitor
    except ImportError as error:
        raise MeterNotFoundError("the zeus meter needs zeus: pip install zeus") from error
    return zeus.monitor


class ZeusMeter(MeterIdentity):
    """A metered `PowerMeter` over one `zeus.monitor.ZeusMonitor` (kwargs go to it)."""

    _name = "zeus"

    def __init__(self, *, zeus_monitor: ModuleType | None = None, **monitor_kwargs: object) -> None:
        module = zeus_monitor if zeus_monitor is not None else import_zeus_monitor()
        self._monitor = module.ZeusMonitor(**monitor_kwargs)
        self._open: set[str] = set()

    def begin_window(self, name: str) -> None:
        if name in self._open:
            raise ValueError(f"measurement window {name!r} is already open; end it before beginning it again")
        self._monitor.begin_window(f"edgeprism:{name}")
        self._open.add(name)

    def end_window(self, name: str) -> Measurement:
        if name not in self._open:
            raise ValueError(f"no open measurement window {name!r}; open windows: {sorted(self._open) or 'none'}")
        result = self._monitor.end_window(f"edgeprism:{name}")
        self._open.discard(name)
        parts_j: dict[str, float] = {}
        for prefix, energies in (("gpu", result.gpu_energy), ("cpu", result.cpu_energy), ("dram", result.dram_energy)):
            for index, energy_j in (energies or {}).items():
                parts_j[f"{prefix}{index}"] = float(energy_j)
        return Measurement(name, float(result.time), sum(parts_j.values()), "metered", "zeus", parts_j)

    def close(self) -> None:
        self._open.clear()
