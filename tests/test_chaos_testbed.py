"""A short chaos run (edgeprism.bench.chaos, the one `scripts/chaos.py` runs for 2 000 requests): 200
requests from 8 HTTP clients over 3 quota-emulated devices on the kernel testbed while devices are
SIGKILLed and restarted, links cut, CPU quotas lowered and links sagged. Nothing may be lost and every
answer must equal one device's. Root (network namespaces) and the MiniLM folder of `make assets`."""

import os
import shutil

import pytest

from edgeprism import assets
from edgeprism.bench.chaos import ChaosRunConfig, run_chaos
from edgeprism.testbed.chaos import ChaosConfig

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.timeout(1200)]


def test_short_chaos_run_loses_nothing_and_answers_exactly(tmp_path):
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("the chaos run needs root, ip and tc (network namespaces, CPU groups)")
    if not (assets.cache_dir() / assets.MINILM_DIRNAME / "model.safetensors").exists():
        pytest.skip("the MiniLM folder is missing: run `make assets`")
    config = ChaosRunConfig(requests=200, hosts=3, chaos=ChaosConfig(seed=1, mean_gap_s=3.0))
    summary = run_chaos(config, tmp_path)
    print(summary)
    assert summary["recorded"] == 200
    assert summary["lost"] == 0, summary["lost_statuses"]
    assert summary["mismatches"] == 0 and summary["min_cosine"] >= config.min_cosine
    assert sum(summary["events"].values()) >= 2, summary["events"]  # faults really happened under the load
    assert not summary["event_errors"], summary["event_errors"]
    assert any(mode.startswith("distributed") for mode in summary["modes"]), summary["modes"]
