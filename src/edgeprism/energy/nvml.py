"""GPU energy from NVIDIA NVML (discrete GPUs; Jetson's integrated GPU has no NVML — use INA3221).

Volta and newer GPUs keep a total-energy counter (`nvmlDeviceGetTotalEnergyConsumption`, mJ since
the driver loaded), read at each window edge like RAPL. Older GPUs only report instantaneous
power (`nvmlDeviceGetPowerUsage`, mW, itself averaged by the driver over about a second), which is
sampled and integrated — coarser for short windows.

`pynvml` (package `nvidia-ml-py`) is imported only when an NVML meter is built; tests pass a fake
module as `nvml`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import ModuleType

from edgeprism.energy.counter import CounterMeter
from edgeprism.energy.measurement import Clock, MeterNotFoundError, PowerMeter
from edgeprism.energy.sampling import SampledMeter


def import_pynvml() -> ModuleType:
    try:
        import pynvml
    except ImportError as error:
        raise MeterNotFoundError(
            "the NVML meter needs pynvml: pip install nvidia-ml-py (and an NVIDIA driver)"
        ) from error
    return pynvml


def nvml_meter(
    device_index: int = 0,
    *,
    period_s: float = 0.02,
    clock: Clock = time.monotonic,
    background: bool = True,
    sync: Callable[[], None] | None = None,
    nvml: ModuleType | None = None,
) -> PowerMeter:
    """A metered `PowerMeter` for GPU `device_index`: the energy counter where the GPU has one,
    else sampled power."""
    nvml = nvml if nvml is not None else import_pynvml()
    try:
        nvml.nvmlInit()
        count = nvml.nvmlDeviceGetCount()
    except nvml.NVMLError as error:
        raise MeterNotFoundError(
            f"NVML did not start ({error}): install the NVIDIA driver, and in a container run with "
            "--gpus all (nvidia-container-toolkit)"
        ) from error
    if not 0 <= device_index < count:
        raise ValueError(f"NVML device_index={device_index}, but this host has {count} NVIDIA GPU(s)")
    handle = nvml.nvmlDeviceGetHandleByIndex(device_index)
    part = f"gpu{device_index}"
    name = f"nvml:{device_index}"
    try:
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except nvml.NVMLError:  # pre-Volta: no energy counter; fall back to sampling power (documented above)
        return SampledMeter(
            name,
            lambda: {part: nvml.nvmlDeviceGetPowerUsage(handle) / 1e3},  # mW -> W
            (part,),
            period_s=period_s,
            clock=clock,
            background=background,
            sync=sync,
        )
    return CounterMeter(
        name,
        lambda: {part: int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))},
        (part,),
        joules_per_count=1e-3,  # mJ; a 64-bit counter, no wrap in practice
        clock=clock,
        sync=sync,
    )
