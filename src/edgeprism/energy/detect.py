"""Choosing a meter: the one asked for, or (auto) the first that works, else a labelled model."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Literal, get_args

from edgeprism.energy.ina3221 import Ina3221Meter
from edgeprism.energy.measurement import Clock, MeterNotFoundError, PowerMeter
from edgeprism.energy.model import ModelledMeter, PowerModel
from edgeprism.energy.nvml import nvml_meter
from edgeprism.energy.rapl import RaplMeter
from edgeprism.energy.sysfs import ReadText, read_text
from edgeprism.energy.zeus import ZeusMeter

logger = logging.getLogger(__name__)

MeterKind = Literal["auto", "ina3221", "rapl", "nvml", "zeus", "modelled"]
METER_KINDS: tuple[str, ...] = get_args(MeterKind)
AUTO_ORDER = ("ina3221", "nvml", "rapl")
"""What `auto` tries, in order: a Jetson's whole-module rail, then a discrete GPU, then the CPU package."""
DEFAULT_POWER_MODEL = "generic-cpu-core"


def detect_meter(
    kind: MeterKind = "auto",
    sysfs_root: str | Path = "/sys",
    power_model: PowerModel | str | None = None,
    *,
    device_index: int = 0,
    period_s: float = 0.02,
    clock: Clock = time.monotonic,
    background: bool = True,
    sync: Callable[[], None] | None = None,
    reader: ReadText = read_text,
    nvml: ModuleType | None = None,
) -> PowerMeter:
    """The meter for this host.

    kind: "auto" tries `AUTO_ORDER` and falls back to the modelled meter with exactly one warning
        that says why each meter was passed over; any other kind builds that meter or raises
        (`MeterNotFoundError`, a ValueError, saying what was looked for and how to enable it;
        `PermissionError` saying which file and how to grant access).
    power_model: the modelled meter's model (name in `POWER_MODELS` or a `PowerModel`);
        default "generic-cpu-core".
    device_index: the GPU for "nvml".
    """
    if kind not in METER_KINDS:
        raise ValueError(f"unknown meter kind {kind!r}; choose one of {list(METER_KINDS)}")
    model = DEFAULT_POWER_MODEL if power_model is None else power_model
    if kind == "modelled":
        return ModelledMeter(model, clock=clock, sync=sync)
    if kind != "auto" and power_model is not None:
        logger.warning("power_model=%s has no effect: meter %r measures energy", power_model, kind)

    def build(which: str) -> PowerMeter:
        if which == "ina3221":
            return Ina3221Meter(sysfs_root, period_s=period_s, clock=clock, background=background, sync=sync,
                                reader=reader)
        if which == "rapl":
            return RaplMeter(sysfs_root, clock=clock, sync=sync, reader=reader)
        if which == "nvml":
            return nvml_meter(device_index, period_s=period_s, clock=clock, background=background, sync=sync,
                              nvml=nvml)
        assert which == "zeus", which
        return ZeusMeter()

    if kind != "auto":
        return build(kind)
    reasons = []
    for which in AUTO_ORDER:
        try:
            meter = build(which)
        except (MeterNotFoundError, PermissionError) as error:
            reasons.append(f"{which}: {error}")
            continue
        logger.info("energy meter: %s (metered)", meter.name)
        return meter
    meter = ModelledMeter(model, clock=clock, sync=sync)
    logger.warning(
        "no power meter on this host, so energy is MODELLED from phase times with power model %r; "
        "every figure is labelled 'modelled'. Meters tried: %s",
        meter.power_model.name, " | ".join(reasons),
    )
    return meter
