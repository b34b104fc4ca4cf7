"""`edgeprism serve` and its serving loop: one JSON line per request, errors per request, HTTP on loopback."""

import json
import time
import urllib.error
import urllib.request

import pytest

from edgeprism.cli.serve import add_parser


def _run_serve(argv):
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", *argv])
    return args.handler(args)


def test_serve_file_answers_each_line_and_survives_bad_ones(tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    lines = [
        json.dumps({"id": "ok1", "synthetic": {"batch": 2, "seq_len": 16}}),
        '{"id": "broken", "model_input": ',                                            # malformed JSON
        json.dumps({"id": "floats", "model_input": {"input_ids": [[1.5, 2.0]]}}),     # wrong dtype
        json.dumps({"id": "ragged", "model_input": {"input_ids": [[1, 2, 3], [4]]}}),  # wrong shape
        json.dumps({"id": "vocab", "model_input": {"input_ids": [[1, 99999]]}}),      # out of the vocabulary
        json.dumps({"id": "big", "synthetic": {"batch": 5, "seq_len": 8}}),           # over --max-batch
        "",
        json.dumps({"id": "ok2", "model_input": {"input_ids": [[5, 6, 7, 8]], "attention_mask": [[1, 1, 1, 0]]},
                    "objective": "energy"}),
    ]
    requests.write_text("\n".join(lines) + "\n")
    code = _run_serve(["--model", "bert-tiny-test", "--synthetic-profile", "--world-size", "1",
                       "--max-batch", "4", "--input", str(requests)])
    assert code == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # an unparseable line cannot name its id: it is answered by line number
    assert [r["id"] for r in out] == ["ok1", "line2", "floats", "ragged", "vocab", "big", "ok2"]
    errors = {r["id"]: r["error"] for r in out if "error" in r}
    assert set(errors) == {"line2", "floats", "ragged", "vocab", "big"}
    assert "JSON" in errors["line2"] and "integers" in errors["floats"] and "ragged" in errors["ragged"]
    assert "vocabulary" in errors["vocab"] and "max batch 4" in errors["big"]
    served = out[-1]
    assert served["metrics"]["mode"] == "local" and served["metrics"]["plan"]["objective"] == "energy"
    assert served["outputs"]["mean"]["shape"] == [1, 64]


def test_serve_refuses_bad_arguments():
    with pytest.raises(ValueError, match="does not exist"):
        _run_serve(["--model", "bert-tiny-test", "--profile", "/nonexistent/profile.json", "--world-size", "1"])
    with pytest.raises(ValueError, match="--world-size 0"):
        _run_serve(["--model", "bert-tiny-test", "--synthetic-profile", "--world-size", "0"])


def _post(url, body: bytes):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_serve_http_command_on_loopback():
    """`edgeprism serve --http` as a user starts it: the API on uvicorn (the API itself: tests/test_api*.py);
    a bad request gets a 4xx and the next is served; SIGINT stops it cleanly."""
    import re
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "edgeprism.cli.main", "serve", "--model", "bert-tiny-test",
                             "--synthetic-profile", "--world-size", "1", "--http", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = None
        deadline = time.monotonic() + 120
        while base is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "serve exited before listening"
            found = re.search(r"listening on (http://[\d.]+:\d+)", line)
            base = found.group(1) if found else None
        assert base and base.startswith("http://127.0.0.1:"), base
        for _ in range(100):  # the socket is bound already; uvicorn answers once started
            try:
                with urllib.request.urlopen(base + "/health", timeout=30) as response:
                    assert json.loads(response.read())["model"] == "bert-tiny-test"
                break
            except urllib.error.URLError:
                time.sleep(0.05)
        status, reply = _post(base + "/infer", b'{"id": "x", "model_input": {"input_ids": [[1, 2], [3]]}}')
        assert status == 400 and reply["id"] == "x" and "ragged" in reply["error"]["message"]
        status, reply = _post(base + "/infer", b"not json")
        assert status == 400 and "JSON" in reply["error"]["message"]
        status, reply = _post(base + "/infer", json.dumps({"id": "y", "synthetic": {"seq_len": 8}}).encode())
        assert status == 200 and reply["id"] == "y" and reply["metrics"]["num_tokens"] == 8
        status, reply = _post(base + "/v1/embeddings", json.dumps({"input": "no tokenizer here"}).encode())
        assert status in (400, 404, 501) and "message" in reply["error"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        lines = [json.loads(line) for line in proc.stdout.read().splitlines() if line.strip()]
        assert [r["id"] for r in lines if "metrics" in r] == ["y"]
    finally:
        if proc.poll() is None:
            proc.kill()
