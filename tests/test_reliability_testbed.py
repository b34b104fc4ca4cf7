"""Peer loss on the kernel testbed (network namespaces, veth, tbf): each rank on its own host.

Rank 0 runs inside host 0's namespace (a driver subprocess); workers inside theirs. A rank is lost by
SIGKILL, or by cutting its host's link (`ip link set eth0 down` in its namespace): the request in flight
is answered locally within the bounded stall, later requests are planned without the rank, and the
rank rejoins (a fresh process, or the same one once its link is back) without restarting rank 0.
Needs root (CI runs as root).
"""

import json
import subprocess
import sys
import textwrap

import pytest

from edgeprism.testbed.net import Testbed
from edgeprism.testbed.presets import LinkPreset

DRIVER = textwrap.dedent('''
    import json, signal, subprocess, sys, time
    from edgeprism.models.config import get_config
    from edgeprism.models.synthetic import synthetic_inputs
    from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile
    from edgeprism.runtime import Engine, EngineConfig, launch_local

    hosts = json.loads(sys.argv[1])          # [[netns, address, ifname], ...]
    case = sys.argv[2]
    vit = get_config("vit-tiny-test")
    profile = synthetic_profile("vit-tiny-test", device_speeds=(1.0, 1.0, 1.0), bandwidth_bps=1e9, latency_s=1e-4,
                                seconds_per_image=3000, codecs=synthetic_codecs(vit.hidden_size)[:1])
    config = EngineConfig(min_stall_s=1.5, stall_factor=3.0, regroup_timeout_s=1.5, join_check_s=0.2, probe_every=0,
                          group_timeout_s=10.0, learn_compute=False,
                          learn_speeds=False)  # plans from the profile: deterministic
    batch = synthetic_inputs(vit, 2, image_size=64, seed=3)
    workers = {r: (["ip", "netns", "exec", hosts[r][0]], hosts[r][1]) for r in range(1, len(hosts))}
    out = {}

    def until(pred, timeout_s=60):
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            m = engine.infer(batch).metrics
            assert not m.fallback, m.fallback
            if pred(m):
                return m
            time.sleep(0.1)
        raise AssertionError(f"not met; healthy {engine.healthy_ranks}")

    with launch_local(3, "vit-tiny-test", profile, config=config, bind_addr=hosts[0][1],
                             worker_hosts=workers) as engine:
        out["first"] = engine.infer(batch).metrics.plan["ranks"]
        plan = engine.plan_for(batch)
        out["stall_s"] = config.stall_s(plan.predicted_latency_s)
        if case == "kill":
            engine.workers.signal(2, signal.SIGKILL)
        else:
            subprocess.run(["ip", "netns", "exec", hosts[2][0], "ip", "link", "set", hosts[2][2], "down"], check=True)
        start = time.monotonic()
        result = engine.infer(batch, plan=plan)
        out["stalled_s"] = time.monotonic() - start
        out["fallback"] = result.metrics.fallback
        with __import__("torch").no_grad():
            ref = engine.model(batch)
        out["exact"] = all(bool((result.outputs[k] - ref[k]).abs().max() < 1e-5) for k in result.outputs)
        out["without"] = until(lambda m: m.mode == "distributed").plan["ranks"]
        if case == "kill":
            engine.workers.restart(2)
        else:
            subprocess.run(["ip", "netns", "exec", hosts[2][0], "ip", "link", "set", hosts[2][2], "up"], check=True)
        out["back"] = until(lambda m: m.mode == "distributed" and m.plan["ranks"] == [0, 1, 2]).plan["ranks"]
        out["failures"] = engine.failures
    print(json.dumps(out))
''')


@pytest.fixture(autouse=True)
def _no_lingering_groups():
    """Let groups that earlier tests' engines retired (kept alive on daemon threads while a stuck operation
    times out) be freed first: freeing a GLOO group whose peer died closes descriptors that this process
    may have reused meanwhile (a known issue, docs/RELIABILITY.md), here the pipes of the driver below."""
    import threading

    for thread in threading.enumerate():
        if thread.name == "edgeprism-retire-groups":
            thread.join(60)
    yield


@pytest.mark.root
@pytest.mark.parametrize("case", ["kill", "link-down"])
def test_lost_rank_on_the_testbed(case):
    with Testbed(3, LinkPreset("lan", rate_bps=200e6, delay_s=0.0005, source="test"), backend="netns") as testbed:
        hosts = [[h.netns, h.address, h.ifname] for h in testbed.hosts]
        argv = ["ip", "netns", "exec", hosts[0][0], sys.executable, "-c", DRIVER, json.dumps(hosts), case]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        print(case, out)
    assert out["first"] == [0, 1, 2]
    assert out["fallback"] and out["exact"]
    assert out["stalled_s"] < out["stall_s"] + 5.0, out
    assert out["without"] == [0, 1]
    assert out["back"] == [0, 1, 2]
    assert out["failures"] == 1
