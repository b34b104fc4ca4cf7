"""The transport-side link: delay per hop, token bucket without root, live link changes."""

import os
import time

import pytest

from edgeprism.testbed.emulation import LINK_FILE_ENV, EmulatedLink, burst_bytes, write_link_file
from edgeprism.testbed.presets import LinkPreset, get_preset


class FakeClock:
    def __init__(self):
        self.now_s = 100.0
        self.slept = []

    def clock(self):
        return self.now_s

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now_s += seconds


def make_link(tmp_path, preset, mode):
    path = tmp_path / "link.json"
    write_link_file(path, preset, mode)
    fake = FakeClock()
    return EmulatedLink(str(path), sleep=fake.sleep, clock=fake.clock), fake, path


def test_from_env_unset_is_none_and_missing_file_is_error(tmp_path):
    assert EmulatedLink.from_env({}) is None
    assert EmulatedLink.from_env({LINK_FILE_ENV: ""}) is None
    with pytest.raises(ValueError, match="testbed up"):
        EmulatedLink.from_env({LINK_FILE_ENV: str(tmp_path / "nope.json")})


def test_kernel_mode_adds_only_delay_per_hop(tmp_path):
    link, _fake, _ = make_link(tmp_path, get_preset("wifi4"), "kernel")
    assert link.before_collective(nbytes_sent=10_000_000, hops=3) == pytest.approx(0.009)
    assert link.before_collective(nbytes_sent=0, hops=0) == 0.0
    assert link.describe() == "kernel tbf 50 Mbit/s + transport delay 3 ms"


def test_transport_mode_token_bucket(tmp_path):
    link, _fake, _ = make_link(tmp_path, LinkPreset("t", 8e6, 0.002, "test"), "transport")
    depth = burst_bytes(8e6)
    # A message within the full bucket pays only the delay.
    assert link.before_collective(depth, hops=1) == pytest.approx(0.002)
    # The bucket is empty now (2 ms refilled 2000 bytes): 1 MB waits ~1 s at 1 MB/s.
    wait = link.before_collective(1_000_000, hops=1)
    assert wait == pytest.approx(0.002 + (1_000_000 - 2000) / 1e6)
    # Back-to-back: the next 100 kB waits 0.1 s less the 2 kB refilled during the last 2 ms of sleep.
    assert link.before_collective(100_000, hops=0) == pytest.approx(0.098)
    assert "EMULATED on loopback" in link.describe()


def test_link_file_change_is_followed(tmp_path):
    link, _fake, path = make_link(tmp_path, get_preset("wifi4"), "kernel")
    assert link.before_collective(0, 1) == pytest.approx(0.003)
    write_link_file(path, get_preset("congested"), "kernel")
    assert link.before_collective(0, 1) == pytest.approx(0.008)
    os.unlink(path)  # the testbed went away: keep the last link
    assert link.before_collective(0, 1) == pytest.approx(0.008)


def test_added_delay_takes_no_cpu(tmp_path):
    """The delay sleeps; it must not steal CPU from the emulated device."""
    path = tmp_path / "link.json"
    write_link_file(path, LinkPreset("slow", 1e6, 0.05, "test"), "transport")
    link = EmulatedLink(str(path))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    slept = link.before_collective(nbytes_sent=50_000, hops=2)
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    assert slept > 0.1 and wall_s >= slept * 0.99
    assert cpu_s < 0.1 * wall_s, f"emulated delay used {cpu_s:.4f} s CPU in {wall_s:.4f} s"
