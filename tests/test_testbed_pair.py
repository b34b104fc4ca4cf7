"""edgeprism.bench.testbed_pair, what the two-board benchmark scripts (scripts/bench_http_batching.py,
scripts/bench_llama_ttft.py) stand on: the rerun inside host 0's namespace is told the pair in `HOST0_ARGS` order
after the script's own `--inner` values and its exit status comes back; there, `joined_pair` has the device of
host 1 joined as rank 1 (a real coordinator and `edgeprism join`; root)."""

import json
import textwrap

import pytest

from edgeprism import assets
from edgeprism.bench.testbed_pair import HOST0_ARGS, Host0, rerun_in_host0

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

REPORT = textwrap.dedent('''
    import json, os, subprocess, sys
    values = sys.argv[sys.argv.index("--inner") + 1:]
    netns = subprocess.run(["ip", "netns", "identify", str(os.getpid())], capture_output=True, text=True).stdout
    with open(sys.argv[1], "w") as handle:
        json.dump({"argv": sys.argv[1:], "netns": netns.strip(), "link_file": os.environ["EDGEPRISM_LINK_FILE"],
                   "secret_exists": os.path.exists(values[-2]), "cores": sorted(os.sched_getaffinity(0))}, handle)
    sys.exit(3)
''')

JOINED = textwrap.dedent('''
    import json, sys
    from edgeprism.bench.testbed_pair import Host0, joined_pair
    from edgeprism.plan.synthetic import synthetic_profile
    from edgeprism.runtime import EngineConfig
    out, folder = sys.argv[1], sys.argv[2]
    _, *pair = sys.argv[sys.argv.index("--inner") + 1:]
    with joined_pair(Host0(*pair), "minilm-l6", synthetic_profile("minilm-l6", world_size=2), folder,
                     EngineConfig(), join_within_s=180, store_port=29420) as engine:
        members = engine.cluster_status()["members"]
    json.dump({"members": members}, open(out, "w"))
''')


def test_the_rerun_runs_in_host_0_and_is_told_the_pair_after_the_scripts_own_values(tmp_path):
    script = tmp_path / "report.py"
    script.write_text(REPORT)
    out = tmp_path / "report.json"
    assert rerun_in_host0(str(script), [str(out)], "wifi4", inner=["wifi4"]) == 3
    seen = json.loads(out.read_text())
    assert seen["argv"][:3] == [str(out), "--inner", "wifi4"] and len(seen["argv"]) == 3 + len(HOST0_ARGS)
    host0 = Host0(*seen["argv"][3:])
    assert seen["netns"].startswith("ep-") and host0.device_netns.startswith("ep-")
    assert host0.device_netns != seen["netns"] and seen["secret_exists"]
    assert seen["cores"] != [int(c) for c in host0.device_cores.split(",")]  # each host pinned to its own cores
    assert host0.address.count(".") == 3


def test_the_device_of_host_1_joins_the_coordinator_in_host_0(tmp_path):
    folder = assets.cache_dir() / "minilm-l6"
    if not (folder / "model.safetensors").exists():
        pytest.skip(f"{folder} is missing: run `make assets`")
    script = tmp_path / "joined.py"
    script.write_text(JOINED)
    out = tmp_path / "joined.json"
    assert rerun_in_host0(str(script), [str(out), str(folder)], "lan", inner=["lan"]) == 0
    assert json.loads(out.read_text()) == {"members": [0, 1]}
