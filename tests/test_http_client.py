"""The one stdlib HTTP client (edgeprism.api.client.FailoverClient) in both of its uses, against a real
HTTP server on loopback that answers from a script: moving to the next address when one does not answer
(a cluster's client), and sending a 5xx again at most `attempts` times (the chaos run's load client,
edgeprism.bench.chaos_client); its failover rule (`Succession`) alone and under the asyncio load generator
(edgeprism.api.load). The cluster behind them: tests/test_failover.py, tests/test_chaos_testbed.py."""

import asyncio
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edgeprism.api.client import FailoverClient, Succession
from edgeprism.api.load import LoadConfig, run_load
from edgeprism.bench.chaos_client import get, one_request, plan_client

EMBEDDING = [0.6, 0.8]


class _Scripted(ThreadingHTTPServer):
    """Answers each request with the next status of `statuses` (the last one repeats); 200 is an embedding."""

    def __init__(self, statuses):
        self.statuses, self.seen = list(statuses), 0
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def _answer(self):
        server = self.server
        status = server.statuses[min(server.seen, len(server.statuses) - 1)]
        server.seen += 1
        body = ({"data": [{"embedding": EMBEDDING}], "edgeprism": {"mode": "local", "ranks": [0], "codec": None}}
                if status == 200 else {"error": {"message": f"scripted {status}"}})
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer()

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(statuses):
        server = _Scripted(statuses)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _plan(url, attempts):
    return {"url": url, "model": "m", "texts": ["a text"], "references": [EMBEDDING], "order": [0],
            "clients": 1, "attempts": attempts, "timeout_s": 10.0, "backoff_s": 0.01}


def test_an_address_that_does_not_answer_is_left_for_the_next_and_any_status_is_an_answer(serve):
    server = serve([503])
    client = FailoverClient([_closed_port_url(), server.url], retry_for_s=10.0, pause_s=0.01)
    reply = client.post("/v1/embeddings", {"input": ["x"]})
    assert (reply.url, reply.status, reply.attempts, client.failovers) == (server.url, 503, 2, 1)
    assert server.seen == 1  # a 5xx is an answer: not sent again by default
    with pytest.raises(ConnectionError, match="in 3 sends"):
        FailoverClient([_closed_port_url()], pause_s=0.01, max_attempts=3).get("/health")
    with pytest.raises(ValueError, match="max_attempts 0"):
        FailoverClient([server.url], max_attempts=0)


def test_the_chaos_client_sends_a_5xx_again_and_keeps_a_4xx(serve):
    server = serve([503, 502, 200])
    row = one_request(_plan(server.url, 5), 0, plan_client(_plan(server.url, 5)))
    assert (row["ok"], row["status"], row["attempts"], row["cosine"], row["mode"]) == (True, 200, 3, 1.0, "local")
    assert row["error"] is None and server.seen == 3

    server = serve([503])
    row = one_request(_plan(server.url, 2), 0, plan_client(_plan(server.url, 2)))
    assert (row["ok"], row["status"], row["attempts"], server.seen) == (False, 503, 2, 2)
    assert "scripted 503" in row["error"]

    server = serve([400, 200])
    row = one_request(_plan(server.url, 5), 0, plan_client(_plan(server.url, 5)))
    assert (row["ok"], row["status"], row["attempts"], server.seen) == (False, 400, 1, 1)

    gone = _closed_port_url()
    row = one_request(_plan(gone, 2), 0, plan_client(_plan(gone, 2)))
    assert (row["ok"], row["status"], row["attempts"]) == (False, None, 2)
    assert row["error"].startswith("ConnectionError")


def test_the_chaos_get_writes_status_and_body(serve, tmp_path):
    server = serve([200])
    get(server.url + "/v1/cluster", str(tmp_path / "get.json"))
    written = json.loads((tmp_path / "get.json").read_text())
    assert written["status"] == 200 and written["body"]["data"][0]["embedding"] == EMBEDDING


def test_a_late_failure_does_not_move_the_succession_back():
    succession = Succession(("http://a", "http://b", "http://c"), retry_for_s=10.0, pause_s=0.5)
    first, late = succession.start(), succession.start()
    assert first.url() == late.url() == "http://a"  # two requests in flight to a
    assert first.failed("refused") == 0.0 and succession.current == 1
    moved = succession.start()
    assert moved.url() == "http://b" and moved.failed("refused") == 0.0 and succession.current == 2
    assert late.failed("refused") == 0.0 and succession.current == 2  # a's second failure: c stays current
    assert (late.url(), succession.failovers) == ("http://c", 3)
    assert succession.start().failed("refused") == 0.5 and succession.current == 0  # a whole round: pause
    once = Succession(("http://a",), retry_for_s=10.0, pause_s=0.0, max_attempts=1).start()
    once.url()
    assert once.failed("refused") is None and "in 1 send over" in str(once.gave_up("GET /"))


def test_the_load_generator_moves_to_the_next_address_that_answers(serve):
    pytest.importorskip("httpx")
    server = serve([200])
    report = asyncio.run(run_load(LoadConfig(url=f"{_closed_port_url()},{server.url}", endpoint="infer",
                                             concurrency=2, requests=4, failover_s=10.0)))
    assert (report.ok, report.errors, server.seen) == (4, 0, 4) and report.failovers >= 1, report
    alone = asyncio.run(run_load(LoadConfig(url=_closed_port_url(), endpoint="infer", requests=2)))
    assert (alone.ok, alone.errors, alone.failovers) == (0, 2, 0), alone  # one URL: no second send
