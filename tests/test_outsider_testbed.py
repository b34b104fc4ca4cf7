"""An outsider on the shared network (root: the kernel testbed, three namespaces on one wifi4 switch).

h0 runs the coordinator (`edgeprism serve --listen ... --http`), h1 a device (`edgeprism join`), h2 the
outsider; a sniffer on the switch sees every frame that crosses "the air". The outsider tries to join
with a wrong secret, reads, overwrites and floods the store, garbles the lane rendezvous keys, connects
to every lane port and sends garbage, and sends garbage to the HTTP port. Through all of it the cluster
answers every request exactly as one device and distributed, the sniffer never sees the request's token
ids on the wire (and does see them with `--seal-lanes off`, the control run under `-m slow`: the check
can fail), and the events are counted in /metrics. docs/SECURITY.md.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from devices import EDGEPRISM, wifi4_testbed
from edgeprism.comm.auth import new_secret, write_secret_file
from edgeprism.models.loading import load_model
from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

MODEL, PORT, HTTP_PORT = "bert-tiny-test", 29400, 8000

CLIENT = textwrap.dedent('''
    import json, sys, urllib.error, urllib.request
    url, body = sys.argv[1], sys.argv[2]
    data = None if body == "-" else body.encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            raw = response.read()
            print(json.dumps({"status": response.status, "text": raw.decode()}))
    except urllib.error.HTTPError as err:
        print(json.dumps({"status": err.code, "text": err.read().decode()}))
''')

SNIFFER = textwrap.dedent('''
    import os, socket, sys
    out, stop = sys.argv[1], sys.argv[2]
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))  # every frame, every port
    sock.settimeout(0.2)
    with open(out, "wb") as handle:
        while not os.path.exists(stop):
            try:
                handle.write(sock.recv(1 << 16))
            except (TimeoutError, socket.timeout):
                pass
''')

OUTSIDER = textwrap.dedent('''
    import json, os, socket, sys, time
    from datetime import timedelta
    import torch.distributed as dist
    store_host, store_port, lane_ports, http, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    done = {}
    store = dist.TCPStore(store_host, store_port, None, False, timedelta(seconds=10))
    keys = store.list_keys()
    seen = b"".join(store.get(k) for k in keys if store.check([k]))
    open(out + ".store", "wb").write(seen)
    done["keys"] = len(keys)
    store.set("edgeprism//auth/boot", os.urandom(16))                    # forge protocol state
    for k in keys:
        if "/lane" in k:
            store.set(k, b"garbage")                                         # lane rendezvous keys
    for i in range(1000):
        store.set(f"flood/{i}", os.urandom(256))                             # flood
    for _ in range(100):
        slot = store.add("edgeprism//join/slots", 1)
        store.set(f"edgeprism//join/{slot}", os.urandom(148))                # garbage joins of the right size
    done["store"] = True
    for spec in filter(None, lane_ports.split(",")):                         # lane ports: garbage, then hold open
        host, port = spec.rsplit(":", 1)
        held = []
        for payload in (os.urandom(1 << 16), b"\\x00" * 64, b""):
            try:
                s = socket.create_connection((host, int(port)), timeout=5)
                if payload:
                    s.sendall(payload)
                held.append(s)
            except OSError as err:
                done.setdefault("lane_errors", []).append(f"{spec}: {err}")
        time.sleep(1.0)
        for s in held:
            s.close()
    done["lanes"] = lane_ports
    host, port = http.rsplit(":", 1)                                         # HTTP garbage
    for payload in (os.urandom(4096), b"GET / HTTP/1.1\\r\\nHost: x\\r\\nX: " + b"a" * 200000 + b"\\r\\n\\r\\n",
                    b"POST /infer HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 9\\r\\n\\r\\n{not json"):
        try:
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(payload)
            s.settimeout(5)
            done.setdefault("http", []).append(s.recv(64).decode(errors="replace").split("\\r\\n")[0])
            s.close()
        except OSError as err:
            done.setdefault("http", []).append(f"error: {err}")
    json.dump(done, open(out, "w"))
''')


@pytest.fixture(scope="module")
def testbed():
    yield from wifi4_testbed(3, "the outsider test")


class Net:
    def __init__(self, tb, tmp):
        self.tb, self.tmp = tb, tmp
        self.h0, self.h1, self.h2 = tb.hosts
        self.env = {**os.environ, "EDGEPRISM_LINK_FILE": tb.link_file}
        self.procs = []
        for name, text in (("client.py", CLIENT), ("sniffer.py", SNIFFER), ("outsider.py", OUTSIDER)):
            (tmp / name).write_text(text)

    def start(self, netns, argv, **kw):
        proc = subprocess.Popen(["ip", "netns", "exec", netns, *argv], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def run(self, netns, argv, timeout_s=300):
        done = subprocess.run(["ip", "netns", "exec", netns, *argv], env=self.env, capture_output=True, text=True,
                              timeout=timeout_s)
        return done

    def call(self, path, body=None):
        done = self.run(self.h0.netns, [sys.executable, str(self.tmp / "client.py"),
                                        f"http://{self.h0.address}:{HTTP_PORT}{path}", body or "-"])
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def listening(self, netns):
        out = self.run(netns, ["ss", "-Hltn"]).stdout
        return [line.split()[3] for line in out.splitlines()]

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _await_line(proc, pattern, timeout_s=180):
    deadline, seen = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r}; saw:\n{''.join(seen[-30:])}")


def _cluster(net, seal, tmp):
    secret = write_secret_file(tmp / f"cluster-{seal}.secret", new_secret())
    profile = synthetic_profile(MODEL, world_size=2, bandwidth_bps=1e9, latency_s=1e-4, seconds_per_image=3000,
                                codecs=synthetic_codecs(load_model(MODEL).config.hidden_size)[:1])
    profile.save(tmp / "profile.json")
    listen = f"{net.h0.address}:{PORT}"
    coordinator = net.start(net.h0.netns, [*EDGEPRISM, "serve", "--model", MODEL, "--profile",
                                           str(tmp / "profile.json"), "--listen", listen, "--world-size", "2",
                                           "--secret-file", str(secret), "--http", "--host", net.h0.address,
                                           "--port", str(HTTP_PORT), "--http-insecure", "--fixed-link", "--min-stall",
                                           "20", "--outputs", "full", "--seal-lanes", seal])
    _await_line(coordinator, r"listening on http://")
    device = net.start(net.h1.netns, [*EDGEPRISM, "join", listen, "--secret-file", str(secret)])
    deadline = time.monotonic() + 120
    while json.loads(net.call("/v1/cluster")["text"])["members"] != [0, 1]:
        assert time.monotonic() < deadline and device.poll() is None, "the device never joined"
        time.sleep(0.5)
    return coordinator, device, secret, listen


def _request(net, ids, reference):
    reply = net.call("/infer", json.dumps({"id": "r", "model_input": {"input_ids": ids.tolist()}}))
    assert reply["status"] == 200, reply
    body = json.loads(reply["text"])
    assert body["edgeprism"]["mode"] == "distributed" and not body["metrics"]["fallback"], body["edgeprism"]
    for key, value in body["outputs"].items():
        assert torch.allclose(torch.tensor(value, dtype=torch.float32), reference[key], atol=1e-4), key


def _leaks(captured: bytes, ids) -> int:
    """How many 8-token runs of the request's ids (int64, as a lane would carry them) appear in the capture."""
    flat = ids.reshape(-1)
    return sum(flat[i:i + 8].numpy().tobytes() in captured for i in range(0, flat.numel() - 8, 4))


@pytest.mark.parametrize("seal", [pytest.param("off", marks=pytest.mark.slow), "auto"])
def test_an_outsider_on_the_network_sees_no_input_and_cannot_stop_the_cluster(testbed, tmp_path, seal):
    net = Net(testbed, tmp_path)
    model = load_model(MODEL)
    ids = torch.randint(5, model.config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        reference = model({"input_ids": ids}, num_tokens=ids.shape[1])
    stop = tmp_path / "stop-sniffing"
    try:
        _cluster(net, seal, tmp_path)
        sniffer = net.start(testbed._switch_ns, [sys.executable, str(tmp_path / "sniffer.py"),
                                                 str(tmp_path / "air.bin"), str(stop)])
        time.sleep(0.5)
        _request(net, ids, reference)
        if seal == "off":  # the control: without sealing the token ids cross the air in clear
            stop.touch()
            sniffer.wait(timeout=30)
            assert _leaks((tmp_path / "air.bin").read_bytes(), ids) > 0
            return

        wrong = write_secret_file(tmp_path / "wrong.secret", new_secret())
        intruder = net.run(testbed.hosts[2].netns, [*EDGEPRISM, "join", f"{net.h0.address}:{PORT}", "--secret-file",
                                                    str(wrong), "--no-retry"], timeout_s=120)
        assert intruder.returncode != 0 and "secret" in intruder.stderr
        lanes = [a for h in (net.h0, net.h1) for a in net.listening(h.netns)
                 if not a.endswith((f":{PORT}", f":{HTTP_PORT}"))]
        assert lanes, "no lane port found"
        outsider = net.run(testbed.hosts[2].netns, [sys.executable, str(tmp_path / "outsider.py"), net.h0.address,
                                                    str(PORT), ",".join(lanes), f"{net.h0.address}:{HTTP_PORT}",
                                                    str(tmp_path / "outsider.json")])
        assert outsider.returncode == 0, outsider.stderr[-3000:]
        report = json.loads((tmp_path / "outsider.json").read_text())
        assert report["store"] and report["keys"] > 0 and len(report["http"]) == 3 and report["lanes"]
        assert report["http"][2].startswith("HTTP/1.1 400"), report["http"]  # the bad body: refused, and counted
        for _ in range(3):
            _request(net, ids, reference)
        stop.touch()
        sniffer.wait(timeout=30)
        air = (tmp_path / "air.bin").read_bytes()
        assert len(air) > 10_000 and _leaks(air, ids) == 0
        assert _leaks((tmp_path / "outsider.json.store").read_bytes(), ids) == 0
        metrics = net.call("/metrics")["text"]
        gauges = dict(re.findall(r"^(edgeprism_\w+) (\S+)$", metrics, re.M))
        assert gauges["edgeprism_sealed_lanes"] == "1"
        assert float(gauges["edgeprism_refused_joins"]) + float(gauges["edgeprism_skipped_join_slots"]) >= 100
        assert float(gauges["edgeprism_restored_store_keys"]) >= 1
        assert re.search(r'edgeprism_http_requests_total\{endpoint="/infer",status="400"\} 1', metrics), metrics
        assert json.loads(net.call("/v1/cluster")["text"])["members"] == [0, 1]
    finally:
        stop.touch()
        net.close()
