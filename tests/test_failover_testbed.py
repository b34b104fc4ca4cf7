"""Failover on the testbed (root: each machine its own network namespace over a kernel-shaped wifi4 link),
with real weights (MiniLM from `make assets`) and the commands of docs/DEPLOY.md section 6b: A runs
`serve --coordinators A,B,C --listen A --http`, B and C `join --coordinators A,B,C --listen B|C`. A is
SIGKILLed; a client in C's namespace (edgeprism.api.client.FailoverClient over the three URLs) gets
embeddings from B within `FAILOVER_BOUND_S`, equal to one device's (cosine >= 0.99999), and C is B's member.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from devices import wifi4_testbed
from edgeprism import assets
from edgeprism.comm.auth import new_secret, write_secret_file
from edgeprism.inputs import load_io
from edgeprism.models.loading import load_model
from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(900)]

EDGEPRISM = str(Path(sys.executable).with_name("edgeprism"))
PORT, HTTP_PORT = 29400, 8000
FAILOVER_BOUND_S = 30.0
# Runs in a namespace; reads the SIGKILL's wall-clock time on stdin, so that its own start is not counted.
CLIENT = textwrap.dedent('''
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    from client import FailoverClient
    urls, path, body = sys.argv[2].split(","), sys.argv[3], json.load(open(sys.argv[4]))
    client = FailoverClient(urls, timeout_s=300, retry_for_s=float(sys.argv[5]))
    killed = float(sys.stdin.readline())
    reply = client.post(path, body) if body is not None else client.get(path)
    print(json.dumps({"url": reply.url, "status": reply.status, "body": reply.body, "after_s": time.time() - killed}))
''')


@pytest.fixture(scope="module")
def testbed():
    yield from wifi4_testbed(3, "the failover testbed test")


def _start(tb, host, argv):
    env = {**os.environ, "EDGEPRISM_LINK_FILE": tb.link_file}
    cmd = ["ip", "netns", "exec", host.netns, "taskset", "-c", ",".join(map(str, host.cores)), *argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _call(tb, tmp, urls, path, body=None, killed_at=None, retry_for_s=5.0):
    payload = tmp / f"body{time.monotonic_ns()}.json"
    payload.write_text(json.dumps(body))
    client_dir = Path(assets.__file__).parents[1] / "api"  # api/client.py alone: standard library only
    proc = subprocess.Popen(["ip", "netns", "exec", tb.hosts[2].netns, sys.executable, str(tmp / "run_client.py"),
                             str(client_dir), ",".join(urls), path, str(payload), str(retry_for_s)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(f"{killed_at if killed_at is not None else time.time()}\n", timeout=600)
    assert proc.returncode == 0, err
    return json.loads(out)


def test_coordinator_sigkill_on_wifi4_the_next_device_serves_embeddings(testbed, tmp_path):
    folder = assets.cache_dir() / assets.MINILM_DIRNAME
    if not (folder / "model.safetensors").exists():
        pytest.skip(f"{folder} is missing: run `make assets`")
    model = load_model("minilm-l6", folder)
    io = load_io(model.config, folder)
    texts = [f"passage {i}: " + " ".join(["the devices hold the same weights and take over"] * 12)
             for i in range(8)]
    inputs = io.encode_texts(texts)
    with torch.no_grad():
        reference = io.embeddings(model(inputs), inputs).to(torch.float64)
    (tmp_path / "run_client.py").write_text(CLIENT)
    secret = write_secret_file(tmp_path / "cluster.secret", new_secret())
    profile = tmp_path / "profile.json"
    synthetic_profile("minilm-l6", world_size=3, bandwidth_bps=1e9, latency_s=1e-4,
                      codecs=synthetic_codecs(model.config.hidden_size)[:1]).save(profile)
    hosts = testbed.hosts
    stores = [f"{h.address}:{PORT}" for h in hosts]
    urls = [f"http://{h.address}:{HTTP_PORT}" for h in hosts]
    common = ["--coordinators", ",".join(stores), "--secret-file", str(secret), "--checkpoint", str(folder)]
    procs = [_start(testbed, hosts[0], [EDGEPRISM, "serve", "--model", "minilm-l6", "--profile", str(profile),
                                        "--world-size", "3", "--listen", stores[0], "--http", "--host",
                                        hosts[0].address, "--port", str(HTTP_PORT), "--http-insecure", "--fixed-link",
                                        *common])]
    procs += [_start(testbed, hosts[i], [EDGEPRISM, "join", "--listen", stores[i], *common]) for i in (1, 2)]
    body = {"model": "minilm-l6", "input": texts}

    def embeddings_exact(reply):
        assert reply["status"] == 200, reply
        got = torch.tensor([d["embedding"] for d in reply["body"]["data"]], dtype=torch.float64)
        assert float(torch.nn.functional.cosine_similarity(got, reference, dim=-1).min()) >= 0.99999

    def wait_members(url, members, timeout_s=180):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if _call(testbed, tmp_path, [url], "/v1/cluster", retry_for_s=60)["body"].get("members") == members:
                return
            time.sleep(1.0)
        raise AssertionError(f"{url} never had members {members}")

    try:
        wait_members(urls[0], [0, 1, 2])
        before = _call(testbed, tmp_path, urls, "/v1/embeddings", body)
        assert before["url"] == urls[0] and before["body"]["edgeprism"]["ranks"] == [0, 1, 2], before["body"]
        embeddings_exact(before)

        os.killpg(procs[0].pid, signal.SIGKILL)
        after = _call(testbed, tmp_path, urls, "/v1/embeddings", body, killed_at=time.time(),
                      retry_for_s=FAILOVER_BOUND_S + 30)
        print(f"wifi4 testbed: first answer at the next address {after['after_s']:.2f} s after the SIGKILL")
        assert after["url"] == urls[1] and after["after_s"] < FAILOVER_BOUND_S, after["after_s"]
        embeddings_exact(after)
        wait_members(urls[1], [0, 1])
        again = _call(testbed, tmp_path, urls[1:], "/v1/embeddings", body)
        assert again["body"]["edgeprism"]["ranks"] == [0, 1], again["body"]["edgeprism"]
        embeddings_exact(again)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for i, proc in enumerate(procs):
            print(f"--- host {i} ---\n{proc.stderr.read()[-2000:]}")
