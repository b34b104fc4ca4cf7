"""INA3221 and RAPL meters against recorded sysfs trees (tests/fixtures/sysfs, see its README)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from edgeprism.energy import (
    Ina3221Meter,
    MeterNotFoundError,
    RaplMeter,
    find_ina3221_rails,
    find_rapl_zones,
    trapezoid_energy_j,
)
from edgeprism.energy.sysfs import read_text

SYSFS = Path(__file__).parent / "fixtures" / "sysfs"


class FakeClock:
    def __init__(self) -> None:
        self.t_s = 100.0

    def __call__(self) -> float:
        return self.t_s


def copy_tree(name: str, tmp_path: Path) -> Path:
    dest = tmp_path / name
    shutil.copytree(SYSFS / name, dest, symlinks=True)
    return dest


def scripted_reader(values: dict[str, list[int]]):
    """Reads the fixture, except files named in `values`, which return their next scripted value."""

    def reader(path: Path) -> str:
        if path.name in values:
            return f"{values[path.name].pop(0)}\n"
        return read_text(path)

    return reader


def denying_reader(denied_name: str):
    """Fails like the kernel does for a root-only file (as root, chmod 000 would not stop us)."""

    def reader(path: Path) -> str:
        if path.name == denied_name:
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path)

    return reader


# --- INA3221: rail discovery -------------------------------------------------------------


def test_orin_nano_hwmon_rails_and_input_rail():
    rails = find_ina3221_rails(SYSFS / "jetson-orin-nano")
    assert [r.name for r in rails] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]  # in7 "sum of shunt voltages" skipped
    assert {r.layout for r in rails} == {"ina3221"}
    meter = Ina3221Meter(SYSFS / "jetson-orin-nano", background=False)
    assert meter.name == "ina3221:VDD_IN"
    assert meter.total_rails == ("VDD_IN",)


def test_hwmon_power_is_milliamps_times_millivolts():
    powers_w = Ina3221Meter(SYSFS / "jetson-orin-nano", background=False).read_power_w()
    assert powers_w["VDD_IN"] == pytest.approx(968 * 5064 / 1e6)  # curr1_input mA x in1_input mV
    assert powers_w["VDD_SOC"] == pytest.approx(281 * 5056 / 1e6)


def test_nano_iio_layout_reads_driver_milliwatts():
    meter = Ina3221Meter(SYSFS / "jetson-nano", background=False)
    assert meter.name == "ina3221:POM_5V_IN"
    assert [r.layout for r in meter.rails] == ["ina3221x"] * 3
    powers_w = meter.read_power_w()
    # in_power0_input is 2305 mW (the driver truncates 4968 mV x 464 mA = 2305.15 mW)
    assert powers_w["POM_5V_IN"] == 2.305
    assert powers_w["POM_5V_GPU"] == 0.079


def test_iio_without_power_file_falls_back_to_current_times_voltage(tmp_path):
    root = copy_tree("jetson-nano", tmp_path)
    (root / "devices/7000c400.i2c/i2c-6/6-0040/iio:device0/in_power0_input").unlink()
    powers_w = Ina3221Meter(root, background=False).read_power_w()
    assert powers_w["POM_5V_IN"] == pytest.approx(464 * 4968 / 1e6)


def test_xavier_nx_iio_layout_finds_vdd_in():
    assert Ina3221Meter(SYSFS / "jetson-xavier-nx", background=False).name == "ina3221:VDD_IN"


def test_agx_xavier_two_chips_without_input_rail_sums_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="edgeprism.energy"):
        meter = Ina3221Meter(SYSFS / "jetson-agx-xavier", background=False)
    assert [r.name for r in meter.rails] == ["GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"]
    assert meter.total_rails == ("GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V")
    assert meter.name == "ina3221:sum(GPU+CPU+SOC+CV+VDDRQ+SYS5V)"
    assert len([r for r in caplog.records if "no INA3221 input rail" in r.getMessage()]) == 1


def test_input_rail_override_and_unknown_rail():
    meter = Ina3221Meter(SYSFS / "jetson-agx-xavier", input_rail="SYS5V", background=False)
    assert meter.total_rails == ("SYS5V",)
    with pytest.raises(ValueError, match=r"input_rail='VDD_IN' is not among the INA3221 rails \['GPU'"):
        Ina3221Meter(SYSFS / "jetson-agx-xavier", input_rail="VDD_IN", background=False)


def test_disabled_hwmon_channel_is_skipped(tmp_path):
    root = copy_tree("jetson-orin-nano", tmp_path)
    (root / "devices/platform/bus@0/c240000.i2c/i2c-1/1-0040/hwmon/hwmon1/in2_enable").write_text("0\n")
    assert [r.name for r in find_ina3221_rails(root)] == ["VDD_IN", "VDD_SOC"]


def test_ina3221_window_integrates_input_rail_with_fake_clock():
    clock = FakeClock()
    currents_ma = [1000, 2000, 2000, 1000]  # VDD_IN at 5064 mV: probe, begin, mid, end
    reader = scripted_reader({"curr1_input": [968] + currents_ma[1:] + [0]})
    meter = Ina3221Meter(SYSFS / "jetson-orin-nano", clock=clock, background=False, reader=reader)
    meter.begin_window("prefill")  # 2000 mA at t = 100.0
    clock.t_s += 0.5
    meter.sample()  # 2000 mA at t = 100.5
    clock.t_s += 0.25
    m = meter.end_window("prefill")  # 1000 mA at t = 100.75
    watts = [2000 * 5.064 / 1e3, 2000 * 5.064 / 1e3, 1000 * 5.064 / 1e3]
    assert m.duration_s == pytest.approx(0.75)
    assert m.energy_j == pytest.approx(trapezoid_energy_j([0, 0.5, 0.75], watts))
    assert m.energy_j == pytest.approx(0.5 * 10.128 + 0.25 * (10.128 + 5.064) / 2)
    assert m.source == "metered" and m.meter == "ina3221:VDD_IN"
    assert set(m.parts_j) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}
    assert m.parts_j["VDD_SOC"] == pytest.approx(0.75 * 281 * 5056 / 1e6)


def test_ina3221_absent_says_where_it_looked():
    with pytest.raises(MeterNotFoundError, match=r"ina3221x/\*/iio:device\*/rail_name_\*.*L4T"):
        Ina3221Meter(SYSFS / "intel-rapl", background=False)


def test_ina3221_permission_error_is_clear():
    with pytest.raises(PermissionError, match=r"curr1_input: permission denied.*chmod a\+r"):
        Ina3221Meter(SYSFS / "jetson-orin-nano", background=False, reader=denying_reader("curr1_input"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads chmod 000 files")
def test_ina3221_chmod_000_on_a_copy(tmp_path):
    root = copy_tree("jetson-nano", tmp_path)
    power_file = root / "devices/7000c400.i2c/i2c-6/6-0040/iio:device0/in_power0_input"
    power_file.chmod(0)
    with pytest.raises(PermissionError, match="in_power0_input: permission denied"):
        Ina3221Meter(root, background=False)


# --- RAPL ------------------------------------------------------------------------------------


def test_rapl_zones_labels_and_totals():
    zones = find_rapl_zones(SYSFS / "intel-rapl")
    assert [z.label for z in zones] == ["package-0", "package-0/core", "package-0/uncore", "package-0/dram", "psys"]
    meter = RaplMeter(SYSFS / "intel-rapl")
    # psys overlaps the package; intel-rapl-mmio:0 duplicates it: neither is totalled
    assert meter.total_parts == ("package-0", "package-0/dram")
    assert meter.name == "rapl:package-0+package-0/dram"
    assert meter.wrap_ranges["package-0"] == 262143328850
    assert meter.wrap_ranges["package-0/dram"] == 65712999613


def test_rapl_window_energy_in_joules():
    clock = FakeClock()
    reader = scripted_reader({"energy_uj": [
        1, 1, 1, 1, 1,  # probe
        10_000_000, 0, 0, 2_000_000, 50,  # begin: package-0, core, uncore, dram, psys
        13_500_000, 0, 0, 2_250_000, 50,  # end
    ]})
    meter = RaplMeter(SYSFS / "intel-rapl", clock=clock, reader=reader)
    meter.begin_window("w")
    clock.t_s += 2.0
    m = meter.end_window("w")
    assert m.parts_j["package-0"] == pytest.approx(3.5)
    assert m.parts_j["package-0/dram"] == pytest.approx(0.25)
    assert m.energy_j == pytest.approx(3.75)
    assert m.duration_s == 2.0 and m.source == "metered"


def test_rapl_wraparound_uses_each_zones_range():
    pkg_max, dram_max = 262143328850, 65712999613
    reader = scripted_reader({"energy_uj": [
        1, 1, 1, 1, 1,
        pkg_max - 1_000_000, 0, 0, dram_max - 500_000, 0,
        2_000_000, 0, 0, 100_000, 0,
    ]})
    meter = RaplMeter(SYSFS / "intel-rapl", clock=FakeClock(), reader=reader)
    meter.begin_window("w")
    m = meter.end_window("w")
    assert m.parts_j["package-0"] == pytest.approx(3.0)
    assert m.parts_j["package-0/dram"] == pytest.approx(0.6)


def test_rapl_permission_error_is_clear():
    with pytest.raises(PermissionError, match=r"energy_uj: permission denied.*root.*chmod a\+r"):
        RaplMeter(SYSFS / "intel-rapl", reader=denying_reader("energy_uj"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads chmod 000 files")
def test_rapl_chmod_000_on_a_copy(tmp_path):
    root = copy_tree("intel-rapl", tmp_path)
    (root / "devices/virtual/powercap/intel-rapl/intel-rapl:0/energy_uj").chmod(0)
    with pytest.raises(PermissionError, match="CVE-2020-8694|root"):
        RaplMeter(root)


def test_rapl_absent_says_how_to_enable():
    with pytest.raises(MeterNotFoundError, match=r"intel-rapl:\*/energy_uj.*modprobe intel_rapl_msr"):
        RaplMeter(SYSFS / "jetson-orin-nano")
