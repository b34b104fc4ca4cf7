"""CPU quotas of testbed hosts: speeds packed onto cores, enforced by a cgroup per host that every process
a host starts lands in, changed live, shown in status and removed with the testbed (also after a crash)."""

import os
import subprocess
import sys
import warnings

import pytest

from edgeprism.testbed import cpu
from edgeprism.testbed.leftovers import cleanup_stale, status
from edgeprism.testbed.net import Testbed
from edgeprism.testbed.presets import get_preset

CPU_LINE = "import os; print([l.split(':', 2)[2] for l in open('/proc/self/cgroup') if l.split(':')[1] == 'cpu'][0])"


def test_speeds_are_packed_so_no_core_is_promised_more_than_one():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 4 x 0.5 and 1.0 + 0.4 fit 2 cores: no warning
        assert sorted(cpu.pack_cores((0.5, 0.5, 0.5, 0.5), [0, 1])) == [(0,), (0,), (1,), (1,)]
        assert cpu.pack_cores((1.0, 0.4), [0, 1]) == [(0,), (1,)]
        assert cpu.pack_cores((1.0, 0.4, 0.5), [0, 1]) == [(0,), (1,), (1,)]
    with pytest.warns(UserWarning, match="compete for cores"):
        cpu.pack_cores((1.0, 1.0, 0.5), [0, 1])


def test_quota_arithmetic_and_bad_speeds():
    assert cpu.quota_us(0.5, 10_000) == 5_000
    assert cpu.quota_us(0.05, 10_000) == cpu.MIN_QUOTA_US  # the kernel's 1 ms minimum
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="device speed"):
            cpu.check_speed(bad)
    with pytest.raises(ValueError, match="2 speeds"):
        Testbed(3, get_preset("lan"), backend="loopback", speeds=(1.0, 0.5))
    with pytest.raises(ValueError, match="exceeds the 1 core"):
        Testbed(2, get_preset("lan"), backend="loopback", speeds=(1.5, 0.5))


def test_command_prefix_without_quota_is_just_netns_and_taskset():
    tb = Testbed(2, get_preset("lan"), backend="loopback")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tb.up()
    try:
        assert tb.command_prefix(tb.hosts[1])[:2] == ["taskset", "-c"]
    finally:
        tb.down()


@pytest.mark.root
@pytest.mark.skipif(cpu.quota_missing() is not None, reason="needs a writable cgroup cpu controller")
def test_hosts_run_in_their_cgroup_with_their_quota_changed_live_and_removed():
    with Testbed(3, get_preset("wifi4"), backend="loopback", speeds=(1.0, 0.4, 0.5)) as tb:
        for host in tb.hosts:
            out = subprocess.run([*tb.command_prefix(host), sys.executable, "-c", CPU_LINE], capture_output=True,
                                 text=True, check=True).stdout.strip()
            assert out == "/" + os.path.basename(host.cgroup)
            quota, period = cpu.read_quota(host.cgroup)
            assert quota / period == pytest.approx(host.speed)
        mine = next(t for t in status()["testbeds"] if t["tag"] == tb.tag)
        assert mine["speeds"] == [1.0, 0.4, 0.5]
        assert [q[0] / q[1] for q in mine["cpu_quotas"]] == pytest.approx([1.0, 0.4, 0.5])
        tb.set_speed(2, 0.125)  # a straggler
        quota, period = cpu.read_quota(tb.hosts[2].cgroup)
        assert quota / period == pytest.approx(0.125) and tb.speeds == (1.0, 0.4, 0.125)
        assert Testbed.attach(tb.tag).speeds == (1.0, 0.4, 0.125)
        with pytest.raises(ValueError, match="exceeds host 2's 1 core"):
            tb.set_speed(2, 2.0)
        groups = [h.cgroup for h in tb.hosts]
    assert not any(os.path.exists(g) for g in groups)


@pytest.mark.root
@pytest.mark.skipif(cpu.quota_missing() is not None, reason="needs a writable cgroup cpu controller")
def test_killed_owner_leaves_no_cgroup_after_cleanup_stale():
    code = ("import os, signal, warnings; warnings.simplefilter('ignore')\n"
            "from edgeprism.testbed.net import Testbed\nfrom edgeprism.testbed.presets import get_preset\n"
            "tb = Testbed(2, get_preset('wifi4'), backend='loopback', speeds=(0.5, 0.5)).up()\n"
            "print(tb.tag, ' '.join(h.cgroup for h in tb.hosts), flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    tag, *groups = proc.stdout.split()
    assert len(groups) == 2 and all(os.path.isdir(g) for g in groups), proc.stderr
    assert f"testbed {tag}" in cleanup_stale()
    assert not any(os.path.exists(g) for g in groups)
