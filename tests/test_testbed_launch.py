"""Launching ranks per host through torchrun, and the link test through the same path.

Each launch starts real torchrun nodes (a few seconds each); the sizes are kept small. Timing is not
asserted here except loosely; the preset-accuracy check is the slow test at the end.
"""

import os
import shutil
import textwrap
import warnings

import pytest

from edgeprism.profile.link import run_link_test
from edgeprism.testbed import netns
from edgeprism.testbed.launch import LaunchError, run_torchrun
from edgeprism.testbed.net import Testbed
from edgeprism.testbed.presets import get_preset

HAVE_IP = shutil.which("ip") is not None and shutil.which("tc") is not None
root_netns = [pytest.mark.root, pytest.mark.skipif(not HAVE_IP, reason="needs ip and tc (iproute2)")]

PROBE = textwrap.dedent("""
    import json, os, sys, time
    import torch.distributed as dist
    mode = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    print(json.dumps({"rank": rank, "world": dist.get_world_size(), "ifname": os.environ["GLOO_SOCKET_IFNAME"],
                      "host": os.environ["EDGEPRISM_TESTBED_HOST"], "cores": sorted(os.sched_getaffinity(0)),
                      "omp": os.environ["OMP_NUM_THREADS"], "link": os.environ["EDGEPRISM_LINK_FILE"],
                      "pid": os.getpid()}), flush=True)
    if mode == "fail" and rank == 1:
        print("rank 1 fails on purpose", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode in ("fail", "hang"):
        time.sleep(600)
    dist.destroy_process_group()
""")


def quiet_testbed(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shared cores on a small CI box
        return Testbed(*args, **kwargs)


def probe(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    return str(path)


def alive(pids):
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


def parse_rows(results):
    import json

    rows = [json.loads(line) for r in results for line in r.stdout.splitlines() if line.startswith('{"rank"')]
    return sorted(rows, key=lambda row: row["rank"])


@pytest.mark.parametrize("backend", ["loopback", pytest.param("netns", marks=root_netns)])
def test_each_host_gets_its_rank_interface_and_cores(tmp_path, backend):
    with quiet_testbed(2, get_preset("lan"), backend=backend) as tb:
        results = run_torchrun(tb, [probe(tmp_path), "ok"], timeout_s=120)
        rows = parse_rows(results)
    assert [r["rank"] for r in rows] == [0, 1]
    for row, host in zip(rows, tb.hosts):
        assert row["host"] == str(host.index)  # rank i runs on host i
        assert row["ifname"] == host.ifname and row["cores"] == list(host.cores) and row["omp"] == "1"
        assert row["link"] == tb.link_file


@pytest.mark.root
@pytest.mark.skipif(not HAVE_IP, reason="needs ip and tc (iproute2)")
@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_failing_or_hung_run_leaks_nothing(tmp_path, mode):
    """One rank fails (or all hang past the timeout): every process is killed, the error carries
    rank 0's stderr, and the testbed's namespaces, links and files are gone afterwards."""
    tb = quiet_testbed(2, get_preset("wifi4"), backend="netns")
    with pytest.raises(LaunchError) as info:
        with tb:
            run_torchrun(tb, [probe(tmp_path), mode], timeout_s=12 if mode == "hang" else 120)
    results = info.value.results
    assert ("timed out" in str(info.value)) == (mode == "hang")
    assert "rank 0 stderr tail" in str(info.value)
    pids = [row["pid"] for row in parse_rows(results)]
    assert len(pids) == 2 and alive(pids) == []
    assert [ns for ns in netns.netns_list() if ns.startswith(f"ep-{tb.tag}-")] == []
    assert not os.path.exists(tb.link_file) and not os.path.exists(tb.state_file)


def test_link_test_on_loopback_reports_emulation():
    with Testbed(2, get_preset("congested"), backend="loopback") as tb:
        m = run_link_test(tb, timeout_s=120, latency_repeats=5)
    assert m.world_size == 2 and m.emulation.startswith("EMULATED on loopback")
    # Loose: the token bucket holds the rate near 15 Mbit/s, never at loopback speed.
    assert 5e6 < m.bandwidth_bps < 30e6
    assert m.latency_min_s >= 0.008


@pytest.mark.root
@pytest.mark.skipif(not HAVE_IP, reason="needs ip and tc (iproute2)")
def test_link_test_through_kernel_testbed_is_shaped():
    with quiet_testbed(2, get_preset("congested"), backend="netns") as tb:
        m = run_link_test(tb, timeout_s=120, latency_repeats=5)
    assert m.emulation == "kernel tbf 15 Mbit/s + transport delay 8 ms"
    assert 5e6 < m.bandwidth_bps < 30e6


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(not HAVE_IP, reason="needs ip and tc (iproute2)")
def test_acceptance_wifi4_within_tolerance_and_lan_much_faster():
    """The issue's bar: at wifi4, bandwidth within 15 % of the preset and latency within 1 ms + 20 %;
    at lan, much faster. The median latency includes waits for a busy core on a shared machine, so it
    is checked only when the machine is not oversubscribed; the fastest sample is always checked."""
    results = {}
    for name in ("wifi4", "lan"):
        with quiet_testbed(2, get_preset(name), backend="netns") as tb:
            results[name] = run_link_test(tb, timeout_s=180)
    wifi4, lan = results["wifi4"], results["lan"]
    preset = get_preset("wifi4")
    print(f"wifi4: {wifi4}\nlan: {lan}")
    assert abs(wifi4.bandwidth_bps - preset.rate_bps) <= 0.15 * preset.rate_bps
    assert abs(wifi4.latency_min_s - preset.delay_s) <= 1e-3 + 0.2 * preset.delay_s
    if os.getloadavg()[0] < len(os.sched_getaffinity(0)):
        assert abs(wifi4.latency_s - preset.delay_s) <= 1e-3 + 0.2 * preset.delay_s
    assert lan.bandwidth_bps > 5 * wifi4.bandwidth_bps
    assert lan.latency_min_s < wifi4.latency_min_s
