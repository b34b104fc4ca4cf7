"""Energy meters (Jetson INA3221 rails, NVML, RAPL, zeus) and an explicitly labelled modelled estimate.

    meter = detect_meter()            # or detect_meter("ina3221"), detect_meter("modelled", power_model=...)
    meter.begin_window("prefill")
    ...
    m = meter.end_window("prefill")   # Measurement(energy_j=..., source="metered" | "modelled", meter=...)

See docs/ENERGY.md for how each meter works and where the power-model numbers come from.
"""

from edgeprism.energy.counter import CounterMeter, counter_delta
from edgeprism.energy.detect import AUTO_ORDER, METER_KINDS, MeterKind, detect_meter
from edgeprism.energy.fake import FakeMeter
from edgeprism.energy.ina3221 import INPUT_RAIL_NAMES, Ina3221Meter, Ina3221Rail, find_ina3221_rails
from edgeprism.energy.measurement import (
    Measurement,
    MeterNotFoundError,
    PowerMeter,
    Source,
    trapezoid_energy_j,
)
from edgeprism.energy.model import (
    PHASES,
    POWER_MODELS,
    ModelledMeter,
    PowerModel,
    get_power_model,
    modelled_energy_j,
    modelled_measurement,
    modelled_parts_j,
)
from edgeprism.energy.nvml import nvml_meter
from edgeprism.energy.rapl import RaplMeter, RaplZone, find_rapl_zones
from edgeprism.energy.sampling import SampledMeter
from edgeprism.energy.zeus import ZeusMeter

__all__ = [
    "AUTO_ORDER",
    "INPUT_RAIL_NAMES",
    "METER_KINDS",
    "PHASES",
    "POWER_MODELS",
    "CounterMeter",
    "FakeMeter",
    "Ina3221Meter",
    "Ina3221Rail",
    "Measurement",
    "MeterKind",
    "MeterNotFoundError",
    "ModelledMeter",
    "PowerMeter",
    "PowerModel",
    "RaplMeter",
    "RaplZone",
    "SampledMeter",
    "Source",
    "ZeusMeter",
    "counter_delta",
    "detect_meter",
    "find_ina3221_rails",
    "find_rapl_zones",
    "get_power_model",
    "modelled_energy_j",
    "modelled_measurement",
    "modelled_parts_j",
    "nvml_meter",
    "trapezoid_energy_j",
]
