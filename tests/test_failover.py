"""No single point of failure (edgeprism.runtime.succession), over loopback with the commands of
docs/DEPLOY.md: `edgeprism serve --coordinators A,B,C --listen A --http` and two `edgeprism join
--coordinators A,B,C --listen B|C` devices. The coordinator is SIGKILLed mid-service; a client that
retries against the next address (edgeprism.api.client) gets an answer from B within `FAILOVER_BOUND_S`,
equal to the single-device model's, and C is B's member. The old coordinator, started again, joins B as a
device instead of starting a second cluster.
"""

import asyncio
import json
import signal
import socket
import subprocess
import time

import pytest
import torch

from devices import EDGEPRISM, stop
from edgeprism.api.client import FailoverClient
from edgeprism.api.load import LoadConfig, run_load
from edgeprism.cli.main import main
from edgeprism.comm.auth import new_secret, write_secret_file
from edgeprism.models.config import get_config
from edgeprism.models.loading import load_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile
from edgeprism.runtime import EngineConfig, launch_engine
from edgeprism.runtime.coordinator import ClusterSpec
from edgeprism.runtime.succession import Succession, parse_coordinators, sweep

VIT = get_config("vit-tiny-test")
BERT = get_config("bert-tiny-test")
FAILOVER_BOUND_S = 30.0
"""From the SIGKILL to the first answer at the next address (measured: docs/RELIABILITY.md)."""
REQUEST = {"id": "r", "synthetic": {"batch": 2, "seq_len": 64, "seed": 3}}  # 64 tokens: every rank plans in


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _expected():
    model = load_model("bert-tiny-test", seed=0)
    with torch.no_grad():
        return model(synthetic_inputs(BERT, 2, seq_len=64, seed=3))


def _exact(reply, expected):
    assert reply.status == 200, reply.body
    outputs = reply.body["outputs"]
    assert outputs and set(outputs) <= set(expected), sorted(outputs)
    for key, got in outputs.items():
        got, value = torch.tensor(got), expected[key]
        assert torch.allclose(got, value, atol=1e-5, rtol=0), (key, (got - value).abs().max())


def _wait_members(url, members, timeout_s=60.0):
    client = FailoverClient([url], timeout_s=10.0, retry_for_s=timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/v1/cluster").body.get("members") == members:
            return
        time.sleep(0.2)
    raise AssertionError(f"{url} has members {client.get('/v1/cluster').body.get('members')}, expected {members}")


def test_succession_rule_is_checked_and_ordered():
    addresses = parse_coordinators("127.0.0.1:1, 127.0.0.1:2,127.0.0.1:3")
    b = Succession(addresses, "127.0.0.1:2")
    assert (b.position, b.earlier, b.others) == (1, ("127.0.0.1:1",), ("127.0.0.1:1", "127.0.0.1:3"))
    with pytest.raises(ValueError, match="not in --coordinators"):
        Succession(addresses, "127.0.0.1:4")
    with pytest.raises(ValueError, match="twice"):
        Succession(("127.0.0.1:1", "127.0.0.1:1"), "127.0.0.1:1")
    with pytest.raises(ValueError, match="at least two"):
        parse_coordinators("127.0.0.1:1")
    port, = _free_ports(1)
    assert sweep((f"127.0.0.1:{port}",), b"s" * 32, 1.0) is None  # nothing listens: not serving, at once
    spec = ClusterSpec("vit-tiny-test", 0, False, 3, 60.0, {}, {}, addresses, {"http_port": 8000})
    assert ClusterSpec.from_json(spec.to_json()) == spec


def test_only_a_store_sealed_with_our_secret_counts_as_serving(tmp_path):
    ours = write_secret_file(tmp_path / "ours.secret", new_secret())
    profile = synthetic_profile("vit-tiny-test", world_size=2, codecs=synthetic_codecs(VIT.hidden_size)[:1])
    engine = launch_engine(2, "vit-tiny-test", profile, local_workers=False, port=0, secret_file=ours,
                           coordinators=("127.0.0.1:1", "127.0.0.1:2"), service={"http_port": 8000})
    try:
        found = sweep((engine.address,), ours.read_bytes(), 2.0)
        assert found is not None and found[1].coordinators == ("127.0.0.1:1", "127.0.0.1:2")
        assert found[1].service == {"http_port": 8000}
        assert sweep((engine.address,), new_secret(), 2.0) is None  # another cluster's (or a stranger's) store
    finally:
        engine.close()


def test_coordinator_sigkill_the_next_address_answers_exactly_and_the_old_one_rejoins(tmp_path, capsys):
    secret = write_secret_file(tmp_path / "cluster.secret", new_secret())
    profile = tmp_path / "profile.json"
    synthetic_profile("bert-tiny-test", device_speeds=(1.0,) * 3, bandwidth_bps=1e9, latency_s=1e-4,
                      seconds_per_image=3000, codecs=synthetic_codecs(BERT.hidden_size)[:1]).save(profile)
    stores = [f"127.0.0.1:{p}" for p in _free_ports(3)]
    http_ports = _free_ports(3)
    urls = [f"http://127.0.0.1:{p}" for p in http_ports]
    listing = ",".join(stores)
    common = ["--secret-file", str(secret), "--coordinators", listing, "--timeout", "30"]

    def serve_a():
        return subprocess.Popen([*EDGEPRISM, "serve", "--model", "bert-tiny-test", "--profile", str(profile),
                                 "--world-size", "3", "--listen", stores[0], "--http", "--host", "127.0.0.1", "--port",
                                 str(http_ports[0]), "--outputs", "full", "--fixed-link", "--min-stall", "1.5",
                                 *common], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    def device(i):
        return subprocess.Popen([*EDGEPRISM, "join", "--listen", stores[i], "--http", f"127.0.0.1:{http_ports[i]}",
                                 "--cores", str(i - 1), *common], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    procs = [serve_a(), device(1), device(2)]
    expected = _expected()
    try:
        _wait_members(urls[0], [0, 1, 2])
        client = FailoverClient(urls, retry_for_s=FAILOVER_BOUND_S + 30)
        before = client.post("/infer", REQUEST)
        assert before.url == urls[0] and before.body["metrics"]["plan"]["ranks"] == [0, 1, 2]
        _exact(before, expected)

        procs[0].kill()  # SIGKILL: no goodbye, the store and the HTTP API are gone at once
        killed = time.monotonic()
        procs[0].wait()
        after = client.post("/infer", REQUEST)
        took_s = time.monotonic() - killed
        with capsys.disabled():  # the measurement docs/RELIABILITY.md quotes (with -s)
            print(f"first answer at the next address {took_s:.2f} s after the SIGKILL")
        assert after.url == urls[1], after
        assert took_s < FAILOVER_BOUND_S, f"the next coordinator answered {took_s:.1f} s after the SIGKILL"
        _exact(after, expected)
        _wait_members(urls[1], [0, 1])  # C walked the list and joined B
        capsys.readouterr()
        assert main(["cluster", "status", listing, "--secret-file", str(secret), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["members"] == [0, 1]  # found at B, the earliest serving
        re_formed = client.post("/infer", REQUEST)
        assert re_formed.body["metrics"]["plan"]["ranks"] == [0, 1] and not re_formed.body["metrics"]["fallback"]
        _exact(re_formed, expected)
        load = asyncio.run(run_load(LoadConfig(url=f"{urls[0]},{urls[1]}", endpoint="infer", concurrency=2,
                                               requests=4, synthetic_tokens=(16, 32), failover_s=10.0)))
        assert (load.ok, load.errors) == (4, 0) and load.failovers >= 1, load  # A is dead: every request to B

        procs[0] = serve_a()  # the old coordinator comes back: it finds B serving and joins it as a device
        _wait_members(urls[1], [0, 1, 2])
        assert sweep(tuple(stores[:1]), secret.read_bytes(), 1.0) is None  # no second cluster at A
        _exact(client.post("/infer", REQUEST), expected)
    finally:
        for proc in procs:
            stop(proc, signal.SIGKILL, 5.0)
        for i, proc in enumerate(procs):
            print(f"--- process {i} stderr ---\n{proc.stderr.read()[-3000:]}")


def test_a_later_coordinator_steps_down_when_an_earlier_one_serves(tmp_path):
    """A split brain healing: B coordinates (A was unreachable), then A serves again as coordinator (the
    other side of a partition); B sees an earlier address serving, steps down and joins A as a device."""
    secret = write_secret_file(tmp_path / "cluster.secret", new_secret())
    profile = synthetic_profile("vit-tiny-test", device_speeds=(1.0,) * 2, bandwidth_bps=1e9, latency_s=1e-4,
                                seconds_per_image=3000, codecs=synthetic_codecs(VIT.hidden_size)[:1])
    profile.save(tmp_path / "profile.json")
    stores = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    http_b, = _free_ports(1)
    b = subprocess.Popen([*EDGEPRISM, "serve", "--model", "vit-tiny-test", "--profile", str(tmp_path / "profile.json"),
                          "--world-size", "2", "--listen", stores[1], "--coordinators", ",".join(stores), "--http",
                          "--host", "127.0.0.1", "--port", str(http_b), "--secret-file", str(secret)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    engine = None
    try:
        _wait_members(f"http://127.0.0.1:{http_b}", [0])  # B coordinates alone: nothing serves at A
        host, port = stores[0].split(":")
        engine = launch_engine(2, "vit-tiny-test", profile, config=EngineConfig(join_check_s=0.1, learn_link=False),
                               local_workers=False, bind_addr=host, port=int(port), secret_file=secret,
                               coordinators=tuple(stores))
        deadline = time.monotonic() + 30
        while engine.cluster_status()["members"] != [0, 1]:
            assert time.monotonic() < deadline, f"B did not step down and join A: {engine.cluster_status()['members']}"
            time.sleep(0.2)
        assert sweep((stores[1],), secret.read_bytes(), 1.0) is None  # B no longer serves a cluster of its own
    finally:
        if engine is not None:
            engine.close()
        stop(b, signal.SIGKILL, 5.0)
        print(b.stderr.read()[-2000:])


def test_coordinators_options_are_checked_with_the_reason(tmp_path, capsys):
    secret = write_secret_file(tmp_path / "cluster.secret", new_secret())
    listing = "127.0.0.1:29401,127.0.0.1:29402"
    for argv, needle in (
            (["join", "--coordinators", listing, "--listen", "127.0.0.1:29403"], "not in --coordinators"),
            (["join", "--coordinators", listing], "needs --listen"),
            (["join", "--listen", "127.0.0.1:29401", "127.0.0.1:29401"], "are for --coordinators"),
            (["serve", "--model", "vit-tiny-test", "--synthetic-profile", "--listen", "127.0.0.1:29401",
              "--coordinators", listing], "--http")):
        assert main([*argv, "--secret-file", str(secret)]) == 2, argv  # the CLI's entry point, in this process
        assert needle in capsys.readouterr().err, argv
