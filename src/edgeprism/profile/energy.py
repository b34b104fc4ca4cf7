"""Energy profiling: power per phase (idle, compute, staging, network) of one device.

With a meter (`edgeprism.energy.detect_meter`: Jetson INA3221, NVML, RAPL) the idle and compute
powers are metered over short windows (and staging on a GPU); the radio cannot be metered here,
so network power is idle plus the power model's radio figure, and `meter` says so. Without a meter
every number comes from the documented power model and the profile says "modelled".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from edgeprism.energy.detect import detect_meter
from edgeprism.energy.measurement import PowerMeter
from edgeprism.energy.model import PowerModel, get_power_model
from edgeprism.models.base import ReferenceModel
from edgeprism.profile.schema import EnergyModel

log = logging.getLogger(__name__)

WINDOW_S = 0.5
"""Length of each metered window: long enough for a sampled meter (INA3221 every 20 ms)."""


def _window_power_w(meter: PowerMeter, name: str, body: Callable[[], None], min_s: float) -> float:
    meter.begin_window(name)
    start = time.perf_counter()
    while time.perf_counter() - start < min_s:
        body()
    return meter.end_window(name).avg_power_w


def modelled_energy(power_model: PowerModel) -> EnergyModel:
    phases = power_model.phase_power_w()
    return EnergyModel(source="modelled", idle_w=power_model.idle_w, compute_w=power_model.compute_w,
                       staging_w=power_model.staging_w, network_w=phases["network_s"],
                       meter=f"model:{power_model.name} ({power_model.scope}); no meter on this host")


def one_block(model: ReferenceModel, num_tokens: int, device: torch.device) -> Callable[[], None]:
    """The compute body `measure_energy` repeats: the model's first block over a random (1, num_tokens, d) batch,
    the device synchronized after it."""
    block = model.blocks[0].to(device)
    probe = torch.randn(1, num_tokens, model.config.hidden_size, device=device)  # (1, N, d)

    def body() -> None:
        with torch.no_grad():
            block(probe)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return body


def measure_energy(compute_body: Callable[[], None], device: torch.device, meter: PowerMeter | None = None,
                   meter_kind: str = "auto", power_model: str | PowerModel | None = None,
                   window_s: float = WINDOW_S) -> EnergyModel:
    """Per-phase power. `compute_body` runs a little model work (one block); it is repeated for a window."""
    model = (
        get_power_model(power_model or "generic-cpu-core") if not isinstance(power_model, PowerModel) else power_model
    )
    if meter is None:
        meter = detect_meter(meter_kind, power_model=model)  # type: ignore[arg-type]
    try:
        if meter.source != "metered":
            return modelled_energy(model)
        idle_w = _window_power_w(meter, "profile-idle", lambda: time.sleep(0.05), window_s)
        compute_w = _window_power_w(meter, "profile-compute", compute_body, window_s)
        staging_w = idle_w
        if device.type == "cuda":
            host = torch.empty(16 << 20, dtype=torch.uint8, pin_memory=True)
            dev = torch.empty(16 << 20, dtype=torch.uint8, device=device)

            def copy() -> None:
                host.copy_(dev, non_blocking=True)
                dev.copy_(host, non_blocking=True)
                torch.cuda.synchronize(device)

            staging_w = _window_power_w(meter, "profile-staging", copy, window_s)
        radio_w = 0.5 * (model.radio_tx_w + model.radio_rx_w)
        return EnergyModel(source="metered", idle_w=idle_w, compute_w=max(compute_w, idle_w), staging_w=staging_w,
                           network_w=idle_w + radio_w,
                           meter=f"{meter.name}: idle, compute{', staging' if device.type == 'cuda' else ''} metered "
                                 f"over {window_s:g} s windows; network = metered idle + {radio_w:g} W radio from "
                                 f"model:{model.name}")
    finally:
        meter.close()


__all__ = ["WINDOW_S", "measure_energy", "modelled_energy"]
