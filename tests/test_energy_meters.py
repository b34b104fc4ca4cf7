"""Window bookkeeping, sampled integration, counters, NVML/zeus with fake modules, detect_meter."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgeprism.energy import (
    CounterMeter,
    FakeMeter,
    Ina3221Meter,
    Measurement,
    MeterNotFoundError,
    ModelledMeter,
    PowerMeter,
    RaplMeter,
    SampledMeter,
    ZeusMeter,
    counter_delta,
    detect_meter,
    nvml_meter,
    trapezoid_energy_j,
)
from edgeprism.energy.sysfs import read_text

SYSFS = Path(__file__).parent / "fixtures" / "sysfs"


class FakeClock:
    def __init__(self) -> None:
        self.t_s = 0.0

    def __call__(self) -> float:
        return self.t_s


@pytest.fixture
def no_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` now raises ImportError


def test_trapezoid():
    assert trapezoid_energy_j([0.0, 1.0, 3.0], [2.0, 4.0, 4.0]) == pytest.approx(3.0 + 8.0)
    assert trapezoid_energy_j([5.0], [100.0]) == 0.0
    with pytest.raises(ValueError, match="2 sample times but 1 power samples"):
        trapezoid_energy_j([0.0, 1.0], [1.0])


def test_measurement_json_round_trip_and_str():
    m = Measurement("prefill", 0.5, 2.0, "metered", "ina3221:VDD_IN", {"VDD_IN": 2.0})
    assert Measurement.from_dict(m.to_dict()) == m
    assert m.avg_power_w == 4.0
    assert "metered by ina3221:VDD_IN" in str(m)
    with pytest.raises(ValueError, match="'guessed'"):
        Measurement.from_dict({**m.to_dict(), "source": "guessed"})


def test_sampled_meter_overlapping_windows_and_total_rails():
    clock = FakeClock()
    power = {"in": 10.0, "sub": 4.0}
    meter = SampledMeter("test:in", lambda: dict(power), ("in",), clock=clock, background=False)
    assert isinstance(meter, PowerMeter)
    meter.begin_window("outer")
    clock.t_s = 1.0
    power["in"] = 20.0
    meter.begin_window("inner")
    clock.t_s = 2.0
    inner = meter.end_window("inner")
    clock.t_s = 3.0
    outer = meter.end_window("outer")
    assert inner.duration_s == 1.0 and inner.energy_j == pytest.approx(20.0)
    # outer: 0->1 s ramps 10->20 W (15 J), then 20 W for 2 s (40 J)
    assert outer.duration_s == 3.0 and outer.energy_j == pytest.approx(55.0)
    assert outer.parts_j["sub"] == pytest.approx(12.0)  # reported, not totalled


def test_window_name_errors():
    meter = SampledMeter("t", lambda: {"in": 1.0}, ("in",), clock=FakeClock(), background=False)
    meter.begin_window("a")
    with pytest.raises(ValueError, match="'a' is already open"):
        meter.begin_window("a")
    with pytest.raises(ValueError, match=r"no open measurement window 'b'; open windows: \['a'\]"):
        meter.end_window("b")


def test_sampled_meter_background_thread_samples_and_stops():
    enough = threading.Event()
    calls = []

    def read() -> dict[str, float]:
        calls.append(1)
        if len(calls) >= 4:
            enough.set()
        return {"in": 5.0}

    syncs = []
    meter = SampledMeter("t", read, ("in",), period_s=0.001, sync=lambda: syncs.append(1))
    meter.begin_window("w")
    assert enough.wait(timeout=30), "sampling thread took no samples"
    m = meter.end_window("w")
    assert meter._thread is None  # stopped with the last window
    assert meter.num_samples >= 4
    assert len(syncs) == 2  # the device is synchronized at the window edges only, never by the thread
    assert m.energy_j == pytest.approx(5.0 * m.duration_s)


def test_sampling_thread_error_is_raised_at_end_window():
    failed = threading.Event()
    calls = []

    def read() -> dict[str, float]:
        calls.append(1)
        if len(calls) == 2:  # the thread's first sample
            failed.set()
            raise OSError("i2c read failed")
        return {"in": 1.0}

    meter = SampledMeter("t", read, ("in",), period_s=0.001)
    meter.begin_window("w")
    assert failed.wait(timeout=30)
    with pytest.raises(RuntimeError, match="sampling thread of t failed: i2c read failed"):
        meter.end_window("w")


def test_counter_delta_wraps_once():
    assert counter_delta(5, 9, 10) == 4
    assert counter_delta(8, 3, 10) == 5
    with pytest.raises(ValueError, match="went backwards"):
        counter_delta(8, 3, None)


def test_counter_meter_with_sync_before_clock():
    events = []
    clock = FakeClock()
    counts = iter([100, 1100])
    meter = CounterMeter("c", lambda: {"gpu0": next(counts)}, ("gpu0",), joules_per_count=1e-3, clock=clock,
                         sync=lambda: events.append("sync"))
    meter.begin_window("w")
    clock.t_s = 0.1
    m = meter.end_window("w")
    assert m.energy_j == pytest.approx(1.0) and m.duration_s == pytest.approx(0.1)
    assert events == ["sync", "sync"]


# --- NVML with a fake pynvml ------------------------------------------------------------------


class FakeNvmlError(Exception):
    pass


def fake_pynvml(*, energy_counter: bool = True, init_ok: bool = True, energy_mj=(1000, 4000), power_mw=50_000):
    energies = iter(energy_mj)

    def init():
        if not init_ok:
            raise FakeNvmlError("Driver Not Loaded")

    def total_energy(handle):
        if not energy_counter:
            raise FakeNvmlError("Not Supported")
        return next(energies)

    return SimpleNamespace(
        NVMLError=FakeNvmlError,
        nvmlInit=init,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"handle{i}",
        nvmlDeviceGetTotalEnergyConsumption=total_energy,
        nvmlDeviceGetPowerUsage=lambda handle: power_mw,
    )


def test_nvml_energy_counter():
    clock = FakeClock()
    meter = nvml_meter(0, clock=clock, nvml=fake_pynvml(energy_mj=(0, 1000, 4000)))
    meter.begin_window("w")
    clock.t_s = 1.0
    m = meter.end_window("w")
    assert m.meter == "nvml:0" and m.energy_j == pytest.approx(3.0) and m.parts_j == {"gpu0": pytest.approx(3.0)}


def test_nvml_without_counter_samples_power():
    clock = FakeClock()
    meter = nvml_meter(0, clock=clock, background=False, nvml=fake_pynvml(energy_counter=False))
    assert isinstance(meter, SampledMeter)
    meter.begin_window("w")
    clock.t_s = 2.0
    assert meter.end_window("w").energy_j == pytest.approx(100.0)  # 50 W x 2 s


def test_nvml_errors():
    with pytest.raises(MeterNotFoundError, match="Driver Not Loaded.*NVIDIA driver"):
        nvml_meter(nvml=fake_pynvml(init_ok=False))
    with pytest.raises(ValueError, match="device_index=3, but this host has 1 NVIDIA GPU"):
        nvml_meter(3, nvml=fake_pynvml())


def test_nvml_missing_pynvml_has_install_hint(no_pynvml):
    with pytest.raises(MeterNotFoundError, match="pip install nvidia-ml-py"):
        nvml_meter()
    with pytest.raises(MeterNotFoundError, match="pip install nvidia-ml-py"):
        detect_meter("nvml")


# --- zeus with a fake module ------------------------------------------------------------------


def test_zeus_adapter_sums_devices():
    class FakeMonitor:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def begin_window(self, key):
            assert key == "edgeprism:w"

        def end_window(self, key):
            return SimpleNamespace(time=2.0, gpu_energy={0: 30.0}, cpu_energy={0: 10.0}, dram_energy=None)

    meter = ZeusMeter(zeus_monitor=SimpleNamespace(ZeusMonitor=FakeMonitor), gpu_indices=[0])
    meter.begin_window("w")
    m = meter.end_window("w")
    assert m.energy_j == 40.0 and m.parts_j == {"gpu0": 30.0, "cpu0": 10.0} and m.source == "metered"


def test_zeus_missing_has_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "zeus", None)
    monkeypatch.setitem(sys.modules, "zeus.monitor", None)
    with pytest.raises(MeterNotFoundError, match="pip install zeus"):
        detect_meter("zeus")


# --- detect_meter -----------------------------------------------------------------------------


def test_auto_prefers_jetson_rails():
    meter = detect_meter(sysfs_root=SYSFS / "jetson-orin-nano", background=False)
    assert isinstance(meter, Ina3221Meter) and meter.name == "ina3221:VDD_IN"


def test_auto_falls_to_rapl_without_nvml(no_pynvml):
    assert isinstance(detect_meter(sysfs_root=SYSFS / "intel-rapl"), RaplMeter)


def test_auto_without_meters_models_with_exactly_one_warning(no_pynvml, caplog):
    with caplog.at_level(logging.DEBUG, logger="edgeprism"):
        meter = detect_meter(sysfs_root=SYSFS / "no-meters", power_model="jetson-orin-nano-15w")
    assert isinstance(meter, ModelledMeter) and meter.source == "modelled"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "MODELLED" in message and "jetson-orin-nano-15w" in message
    assert "ina3221:" in message and "rapl:" in message and "nvml:" in message


def test_auto_skips_unreadable_rapl_and_says_why(no_pynvml, caplog):
    def deny(path: Path) -> str:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path)

    with caplog.at_level(logging.WARNING, logger="edgeprism"):
        meter = detect_meter(sysfs_root=SYSFS / "intel-rapl", reader=deny)
    assert isinstance(meter, ModelledMeter)
    assert len(caplog.records) == 1 and "chmod a+r" in caplog.records[0].getMessage()


def test_explicit_meter_absent_raises_with_how_to_enable():
    with pytest.raises(ValueError, match="modprobe intel_rapl_msr"):
        detect_meter("rapl", sysfs_root=SYSFS / "no-meters")
    with pytest.raises(ValueError, match="ina3221x.*L4T"):
        detect_meter("ina3221", sysfs_root=SYSFS / "intel-rapl")


def test_explicit_meter_unreadable_raises_permission_error():
    def deny(path: Path) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    with pytest.raises(PermissionError, match="root"):
        detect_meter("rapl", sysfs_root=SYSFS / "intel-rapl", reader=deny)


def test_detect_meter_bad_kind_and_ignored_power_model(caplog):
    with pytest.raises(ValueError, match=r"unknown meter kind 'joulescope'; choose one of \['auto'"):
        detect_meter("joulescope")  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="edgeprism"):
        detect_meter("rapl", sysfs_root=SYSFS / "intel-rapl", power_model="laptop-cpu")
    assert "has no effect" in caplog.records[0].getMessage()


def test_explicit_modelled_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="edgeprism"):
        meter = detect_meter("modelled", power_model="laptop-cpu")
    assert meter.name == "model:laptop-cpu" and not caplog.records


def test_fake_meter():
    clock = FakeClock()
    meter = FakeMeter(power_w=8.0, clock=clock)
    assert isinstance(meter, PowerMeter)
    meter.begin_window("w")
    clock.t_s = 0.25
    assert meter.end_window("w").energy_j == 2.0
