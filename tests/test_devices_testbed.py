"""Exactness at CR = 1 over 3 and 4 emulated devices of different CPU quotas, with uneven token shares:
one rank per testbed host (its own network namespace and cgroup), launched by torchrun."""

import shutil

import pytest

from edgeprism.comm.launch import JobSession
from edgeprism.runtime.batch import BatchSpec, batch_rank
from edgeprism.testbed import cpu
from edgeprism.testbed.presets import get_preset

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(shutil.which("ip") is None or shutil.which("tc") is None, reason="needs ip and tc"),
              pytest.mark.skipif(cpu.quota_missing() is not None, reason="needs a writable cgroup cpu controller")]


@pytest.mark.parametrize("model,speeds,shares", [
    ("vit-tiny-test", (1.0, 0.4, 0.5), (0.5, 0.2, 0.3)),
    ("bert-tiny-test", (0.5, 0.5, 0.5, 0.5), (0.4, 0.1, 0.3, 0.2)),
])
def test_cr1_matches_one_device_on_quota_limited_hosts(model, speeds, shares):
    spec = BatchSpec(model=model, batch=2, world_size=len(speeds), shares=shares, codec="fp32", warmup=0,
                     repeats=1, compare_local=True, backend="gloo")
    with JobSession(len(speeds), get_preset("lan"), backend="netns", speeds=speeds, timeout_s=240) as session:
        assert [h.speed for h in session.testbed.hosts] == list(speeds)
        assert all(h.cgroup for h in session.testbed.hosts)
        result = session.run(batch_rank, spec.to_dict(), dist_backend="gloo")
    assert result["world_size"] == len(speeds)
    assert result["max_abs_diff"] <= 1e-5
