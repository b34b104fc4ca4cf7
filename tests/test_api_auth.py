"""The HTTP API's protection (edgeprism.api.auth) over a real two-rank bert-tiny-test engine: a bearer API
key (missing / wrong → 401 in OpenAI's shape, right → the engine's answer), /health open and /metrics
closed unless asked, TLS with a self-signed certificate made here (an answer over https, the key and the
certificate given to the failover client), the refusal to open an unprotected API off loopback, and a
promoted coordinator serving with the protection its cluster spec names (file paths, never the key).
Then the store's side (edgeprism.api.store_watch): /metrics shows a fresh client's round trip to the
rendezvous store and the keys a stranger floods it with, a store that does not answer counts as a stall,
a coordinator raises its open-files limit so that idle connections cannot exhaust its descriptors, and a
store started with an allow list (edgeprism.runtime.store_filter) never sees a stranger's connection."""

import asyncio
import datetime
import ipaddress
import json
import re
import resource
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.testclient import TestClient

from api_adapters import WordIO
from edgeprism.api import ApiConfig, make_app, serve_http
from edgeprism.api.auth import HttpAccess, check_exposure, is_loopback
from edgeprism.api.client import FailoverClient
from edgeprism.api.load import LoadConfig, run_load
from edgeprism.api.store_watch import StoreWatch
from edgeprism.cli.join import serve_promoted
from edgeprism.cli.main import main
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.runtime import launch_local
from edgeprism.runtime.coordinator import ClusterSpec, start_store
from edgeprism.runtime.store_filter import filter_program, parse_allow, raise_open_files_limit

MODEL = "bert-tiny-test"
KEY = "k3y-" + "0123456789abcdef" * 2
REQUEST = {"id": "r1", "synthetic": {"batch": 1, "seq_len": 16, "seed": 5}}


@pytest.fixture(scope="module")
def engine():
    with launch_local(2, MODEL, synthetic_profile(MODEL, world_size=2)) as engine:
        yield engine


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("key") / "api.key"
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and its key (PEM files)."""
    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeprism test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return str(folder / "cert.pem"), str(folder / "key.pem")


def _embed(client, **headers):
    return client.post("/v1/embeddings", json={"model": "tiny", "input": ["the quick brown fox"]}, headers=headers)


def test_api_key_missing_or_wrong_is_401_in_openai_shape_and_the_right_one_answers(engine, key_file):
    io = WordIO("text-encoder", MODEL, vocab_size=1000, max_tokens=32)
    app = make_app(engine, io, ApiConfig(model_name="tiny"), access=HttpAccess(api_key_file=str(key_file)))
    with TestClient(app) as client:
        for headers, code in (({}, "missing_api_key"), ({"authorization": "Bearer "}, "missing_api_key"),
                              ({"authorization": f"Basic {KEY}"}, "missing_api_key"),
                              ({"authorization": "Bearer " + KEY[:-1] + "x"}, "invalid_api_key"),
                              ({"authorization": "Bearer " + KEY + "0"}, "invalid_api_key")):
            reply = _embed(client, **headers)
            assert reply.status_code == 401, (headers, reply.text)
            error = reply.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
            assert error["type"] == "invalid_request_error" and KEY not in reply.text
            assert reply.headers["www-authenticate"].startswith("Bearer")
        assert client.post("/infer", json=REQUEST).status_code == 401
        assert client.get("/v1/models").status_code == 401 and client.get("/metrics").status_code == 401

        reply = _embed(client, authorization=f"Bearer {KEY}")
        assert reply.status_code == 200, reply.text
        expected = engine.infer(io.encode_texts(["the quick brown fox"])).outputs["mean"][0]
        assert torch.allclose(torch.tensor(reply.json()["data"][0]["embedding"]), expected, atol=1e-5)
        assert _embed(client, authorization=f"bearer  {KEY} ").status_code == 200  # scheme case, spaces

        assert client.get("/health").status_code == 200  # a liveness probe needs no key
        metrics = client.get("/metrics", headers={"authorization": f"Bearer {KEY}"}).text
        assert 'edgeprism_http_unauthorized_total{code="invalid_api_key"} 2' in metrics
        assert 'edgeprism_http_unauthorized_total{code="missing_api_key"} 6' in metrics
        assert 'edgeprism_http_requests_total{endpoint="/v1/embeddings",status="401"} 5' in metrics

    opened = make_app(engine, io, ApiConfig(model_name="tiny"),
                      access=HttpAccess(api_key_file=str(key_file), metrics_open=True))
    with TestClient(opened) as client:
        assert client.get("/metrics").status_code == 200 and _embed(client).status_code == 401


def test_a_bad_key_file_or_half_a_tls_pair_is_refused_with_the_reason(engine, tmp_path):
    short = tmp_path / "short.key"
    short.write_text("abc")
    for path, needle in ((short, "at least 16"), (tmp_path / "none.key", "cannot read")):
        with pytest.raises(ValueError, match=needle):
            make_app(engine, None, access=HttpAccess(api_key_file=str(path)))
    with pytest.raises(ValueError, match="both a certificate and its key"):
        HttpAccess(tls_cert_file="cert.pem")


def _serve_in_thread(engine, access, host="127.0.0.1"):
    """serve_http on a free port in a thread; returns (port, stop, thread)."""
    ready, stop = threading.Event(), threading.Event()
    bound = {}

    def on_ready(h, p):
        bound["port"] = p
        ready.set()

    thread = threading.Thread(target=serve_http, args=(engine, None, host, 0, ApiConfig()),
                              kwargs=dict(on_ready=on_ready, stop=stop, access=access), daemon=True)
    thread.start()
    assert ready.wait(30), "the server did not start"
    return bound["port"], stop, thread


def _exact(reply, engine):
    assert reply.status == 200, reply.body
    inputs = synthetic_inputs(engine.model.config, 1, seq_len=16, seed=5)
    with torch.no_grad():
        expected = engine.model(inputs)["mean"]
    assert reply.body["outputs"]["mean"]["shape"] == list(expected.shape)


def test_tls_with_a_self_signed_certificate_answers_over_https(engine, key_file, tls_files):
    cert, key = tls_files
    port, stop, thread = _serve_in_thread(engine, HttpAccess(api_key_file=str(key_file), tls_cert_file=cert,
                                                             tls_key_file=key))
    try:
        url = f"https://127.0.0.1:{port}"
        _exact(FailoverClient([url], api_key=KEY, ca_file=cert, retry_for_s=0).post("/infer", REQUEST), engine)
        assert FailoverClient([url], ca_file=cert, retry_for_s=0).post("/infer", REQUEST).status == 401
        report = asyncio.run(run_load(LoadConfig(url=url, endpoint="infer", concurrency=2, requests=4,
                                                 synthetic_tokens=(8, 16), api_key=KEY, ca_file=cert)))
        assert report.ok == 4 and report.errors == 0, report.first_error
        refused = asyncio.run(run_load(LoadConfig(url=url, endpoint="infer", requests=1, ca_file=cert)))
        assert refused.error_statuses == {"401": 1}
        with pytest.raises(ConnectionError):  # the system's CAs do not trust a self-signed certificate
            FailoverClient([url], api_key=KEY, retry_for_s=0).post("/infer", REQUEST)
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP to the TLS port
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read()
    finally:
        stop.set()
        thread.join(30)


def test_an_unprotected_api_is_refused_off_loopback(engine, key_file, tmp_path, capsys):
    assert is_loopback("127.0.0.1") and is_loopback("127.3.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("edge1.lan")
    check_exposure("127.0.0.1", 8000, HttpAccess())
    check_exposure("0.0.0.0", 8000, HttpAccess(api_key_file=str(key_file)))
    check_exposure("0.0.0.0", 8000, HttpAccess(insecure=True))
    with pytest.raises(ValueError, match="refusing to serve the HTTP API on 0.0.0.0:8000 without an API key"):
        serve_http(engine, None, "0.0.0.0", 8000)
    # the command refuses before it loads or starts anything, and says how
    argv = ["serve", "--model", MODEL, "--synthetic-profile", "--world-size", "1", "--http", "--host", "0.0.0.0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--api-key-file FILE" in err and "--http-insecure" in err and "openssl rand" in err
    assert main(["serve", "--model", MODEL, "--synthetic-profile", "--api-key-file", str(key_file)]) == 2
    assert "are for --http" in capsys.readouterr().err
    assert main(["serve", "--model", MODEL, "--synthetic-profile", "--store-allow", "10.0.0.2"]) == 2
    assert "is for --listen" in capsys.readouterr().err


def test_a_promoted_coordinator_serves_with_the_key_and_tls_its_spec_names(engine, key_file, tls_files):
    cert, key = tls_files
    access = HttpAccess(api_key_file=str(key_file), tls_cert_file=cert, tls_key_file=key)
    service = {"http_port": 8000, "served_model_name": None, "dynamic_batching": True, "batch_window_s": 0.005,
               "outputs": "summary", "access": access.to_service()}
    spec = ClusterSpec(model=MODEL, seed=0, checkpoint=False, world_size=1, timeout_s=10.0, config={},
                       profile={}, coordinators=("127.0.0.1:29400",), service=service)
    assert KEY not in spec.to_json().decode() and str(key_file) in spec.to_json().decode()
    spec = ClusterSpec.from_json(spec.to_json())  # as a device reads it from the store
    said, stop = [], threading.Event()
    thread = threading.Thread(target=serve_promoted, args=(engine, spec, stop, "127.0.0.1:29400", "127.0.0.1:0",
                                                           None, said.append), daemon=True)
    thread.start()
    try:
        for _ in range(300):
            found = [re.search(r"listening on https://127.0.0.1:(\d+)", s) for s in said]
            if any(found):
                break
            stop.wait(0.1)
        port = int(next(m for m in found if m).group(1))
        url = f"https://127.0.0.1:{port}"
        _exact(FailoverClient([url], api_key=KEY, ca_file=cert, retry_for_s=0).post("/infer", REQUEST), engine)
        refused = FailoverClient([url], api_key="x" * 20, ca_file=cert, retry_for_s=0).post("/infer", REQUEST)
        assert refused.status == 401 and refused.body["error"]["code"] == "invalid_api_key", json.dumps(refused.body)
    finally:
        stop.set()
        thread.join(30)


def _gauge(text, name):
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_metrics_show_the_store_round_trip_and_a_flood_of_keys(engine):
    from datetime import timedelta

    import torch.distributed as dist

    app = make_app(engine, None, ApiConfig(store_watch_s=0.1))
    with TestClient(app) as client:
        time.sleep(0.5)
        first = client.get("/metrics").text
        assert 0 <= _gauge(first, "edgeprism_store_probe_seconds") < 5 and _gauge(first, "edgeprism_store_stalls") == 0
        assert _gauge(first, "edgeprism_process_rss_bytes") > 1e7
        host, _, port = engine.address.rpartition(":")
        stranger = dist.TCPStore(host, int(port), None, False, timedelta(seconds=10))
        keys = _gauge(first, "edgeprism_store_keys")
        for i in range(200):
            stranger.set(f"flood/{i}", b"x" * 64)
        deadline = time.monotonic() + 30
        while _gauge(client.get("/metrics").text, "edgeprism_store_keys") < keys + 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for i in range(200):
            stranger.delete_key(f"flood/{i}")


def test_a_store_that_does_not_answer_is_a_stall():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    watch = StoreWatch(f"127.0.0.1:{port}", interval_s=1.0, stall_s=0.5, timeout_s=1.0)
    watch.probe_once()
    gauges = watch.gauges()
    assert gauges["edgeprism_store_probe_seconds"][1] == -1 and gauges["edgeprism_store_stalls"][1] == 1


def test_a_coordinator_raises_its_open_files_limit_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip(f"the hard open-files limit is {hard}: nothing to raise to")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # a device's low default
        raise_open_files_limit()
        raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raised == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _connects(source, port):
    with socket.socket() as s:
        s.bind((source, 0))
        s.settimeout(1.0)
        try:
            s.connect(("127.0.0.1", port))
            return True
        except OSError:  # the filter dropped the SYN: the connect times out
            return False


def test_a_store_with_an_allow_list_drops_strangers_packets_and_serves_its_members():
    from datetime import timedelta

    import torch.distributed as dist

    with pytest.raises(ValueError, match="not an IPv4 address"):
        parse_allow("192.168.1.300")
    with pytest.raises(ValueError, match="1..64"):
        filter_program(parse_allow(",".join(f"10.0.{i}.1" for i in range(65))))
    store, port = start_store("127.0.0.1", 0, 10.0, allow=parse_allow("127.0.0.3, 10.8.0.0/24"))
    assert _connects("127.0.0.3", port) and _connects("127.0.0.1", port)  # a member; this host itself
    assert not _connects("127.0.0.2", port)  # a stranger: the store never sees it
    member = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=10))
    member.set("k", b"v")
    assert store.get("k") == b"v"
