"""The HTTP API over a real one-rank bert-tiny-test engine: OpenAI-style embeddings, models, /infer,
health, metrics, and every kind of bad request answered with a 4xx while serving goes on."""

import base64
import struct

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("tokenizers")

from starlette.testclient import TestClient

from api_adapters import WordIO
from edgeprism.api import ApiConfig, make_app
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.runtime import launch_local

MODEL = "bert-tiny-test"


@pytest.fixture(scope="module")
def engine():
    with launch_local(1, MODEL, synthetic_profile(MODEL, world_size=1)) as engine:
        yield engine


@pytest.fixture(scope="module")
def io():
    return WordIO("text-encoder", MODEL, vocab_size=1000, max_tokens=32, labels=["positive", "negative", "neutral"])


@pytest.fixture(scope="module")
def replies():
    return []


@pytest.fixture(scope="module")
def client(engine, io, replies):
    app = make_app(engine, io, ApiConfig(model_name="tiny-embed", max_body_bytes=4096, max_texts=4),
                   on_reply=replies.append)
    with TestClient(app) as client:
        yield client


def _embed(client, body, **kwargs):
    return client.post("/v1/embeddings", json=body, **kwargs)


def test_embeddings_match_the_engine_and_carry_the_plan(client, engine, io):
    texts = ["the quick brown fox", "a cat sat on the mat while the dog jumps"]
    reply = _embed(client, {"model": "tiny-embed", "input": texts})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "list" and body["model"] == "tiny-embed"
    assert [d["index"] for d in body["data"]] == [0, 1] and body["data"][0]["object"] == "embedding"
    for text, item in zip(texts, body["data"]):
        alone = io.encode_texts([text])
        expected = engine.infer(alone).outputs["mean"][0]
        assert torch.allclose(torch.tensor(item["embedding"]), expected, atol=1e-5)
    tokens = sum(n for n in io.count_tokens(texts))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    info = body["edgeprism"]
    assert info["mode"] == "local" and info["ranks"] == [0] and info["rows"] == 2 and info["batched_with"] >= 1
    assert info["fidelity_loss"] == 0.0  # a local answer is exact
    assert info["energy_source"] == "modelled" and info["latency_ms"] > 0 and info["predicted_latency_ms"] > 0
    header = reply.headers["x-edgeprism-plan"]
    assert header.startswith("local ranks=0 ") and "latency_ms=" in header and "predicted_ms=" in header
    assert reply.headers["x-request-id"] == info["request_id"]


def test_single_string_base64_and_labels(client):
    plain = _embed(client, {"model": "tiny-embed", "input": "the fox"}).json()["data"]
    packed = _embed(client, {"model": "tiny-embed", "input": "the fox", "encoding_format": "base64"}).json()["data"]
    raw = base64.b64decode(packed[0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(plain) == 1 and decoded == pytest.approx(plain[0]["embedding"], abs=1e-6)
    labelled = _embed(client, {"model": "tiny-embed", "input": ["the fox"], "labels": True}).json()["data"][0]
    assert len(labelled["labels"]) == 3 and {x["label"] for x in labelled["labels"]} == {"positive", "negative",
                                                                                        "neutral"}
    assert sum(x["score"] for x in labelled["labels"]) == pytest.approx(1.0, abs=1e-5)


def test_models_health_and_request_id(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-embed"
    assert models["data"][0]["edgeprism"]["architecture"] == MODEL
    assert client.get("/v1/models/tiny-embed").json()["id"] == "tiny-embed"
    assert client.get("/v1/models/gpt-4").status_code == 404
    health = client.get("/health").json()
    assert health["ok"] and health["model"] == "tiny-embed" and health["healthy_ranks"] == [0]
    reply = _embed(client, {"model": "tiny-embed", "input": "fox"}, headers={"X-Request-Id": "client-7"})
    assert reply.json()["edgeprism"]["request_id"] == "client-7"


@pytest.mark.parametrize("body, kwargs, status, code", [
    ({"model": "gpt-4", "input": "fox"}, {}, 404, "model_not_found"),
    ({"input": "fox"}, {}, 400, "missing_parameter"),
    ({"model": "tiny-embed", "input": 5}, {}, 400, "invalid_type"),
    ({"model": "tiny-embed", "input": [[1, 2, 3]]}, {}, 400, "invalid_type"),
    ({"model": "tiny-embed", "input": []}, {}, 400, "invalid_value"),
    ({"model": "tiny-embed", "input": ["a"] * 5}, {}, 400, "too_many_inputs"),
    ({"model": "tiny-embed", "input": "fox", "temperature": 1}, {}, 400, "unknown_parameter"),
    ({"model": "tiny-embed", "input": "fox", "encoding_format": "int8"}, {}, 400, "invalid_value"),
    ({"model": "tiny-embed", "input": "fox", "labels": "yes"}, {}, 400, "invalid_type"),
    ({"model": "tiny-embed", "input": " ".join(["fox"] * 40)}, {}, 400, "invalid_input"),  # too long
    (None, {"content": b'{"model": "tiny-embed", "input": '}, 400, "invalid_json"),
    (None, {"content": b'["a list"]'}, 400, "invalid_json"),
    (None, {"content": b"input=fox", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
     415, "unsupported_media_type"),
    (None, {"content": b'{"input": "' + b"x" * 5000 + b'"}'}, 413, "body_too_large"),
])
def test_bad_requests_get_openai_errors_and_serving_goes_on(client, body, kwargs, status, code):
    if body is not None:
        kwargs = {"json": body}
    elif "headers" not in kwargs:
        kwargs = {**kwargs, "headers": {"Content-Type": "application/json"}}
    assert _embed(client, {"model": "tiny-embed", "input": "before"}).status_code == 200
    reply = client.post("/v1/embeddings", **kwargs)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code and error["type"] in ("invalid_request_error", "not_found_error")
    assert error["message"] and "param" in error
    assert _embed(client, {"model": "tiny-embed", "input": "after"}).status_code == 200


def test_error_messages_name_the_numbers(client):
    long = _embed(client, {"model": "tiny-embed", "input": " ".join(["fox"] * 40)}).json()["error"]["message"]
    assert "42 tokens" in long and "32" in long
    many = _embed(client, {"model": "tiny-embed", "input": ["a"] * 5}).json()["error"]["message"]
    assert "5 items" in many and "at most 4" in many
    wrong = _embed(client, {"model": "gpt-4", "input": "a"}).json()["error"]["message"]
    assert "'gpt-4'" in wrong and "'tiny-embed'" in wrong
    unknown = client.get("/v1/nowhere")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    assert client.get("/v1/embeddings").status_code == 405
    images = client.post("/v1/classify", content=b"\x89PNG", headers={"Content-Type": "image/png"}).json()
    assert images["error"]["code"] == "unsupported_endpoint" and "/v1/embeddings" in images["error"]["message"]
    completions = client.post("/v1/completions", json={"model": "tiny-embed", "prompt": "a"}).json()
    assert completions["error"]["code"] == "unsupported_endpoint"


def test_infer_keeps_the_tensor_json_requests(client):
    """The requests of edgeprism.runtime.requests, as the stdlib server answered them (test_serve.py)."""
    reply = client.post("/infer", content=b'{"id": "x", "model_input": {"input_ids": [[1, 2], [3]]}}')
    assert reply.status_code == 400 and reply.json()["id"] == "x" and "ragged" in reply.json()["error"]["message"]
    reply = client.post("/infer", content=b"not json")
    assert reply.status_code == 400 and "JSON" in reply.json()["error"]["message"]
    reply = client.post("/infer", json={"id": "y", "synthetic": {"seq_len": 8}})
    body = reply.json()
    assert reply.status_code == 200 and body["id"] == "y" and body["metrics"]["num_tokens"] == 8
    assert body["outputs"]["mean"]["shape"] == [1, 64] and body["edgeprism"]["engine_request_id"] == "y"
    assert reply.headers["x-edgeprism-plan"].startswith("local ")
    reply = client.post("/infer", json={"id": "z", "synthetic": {"batch": 2, "seq_len": 4}, "objective": "energy"})
    assert reply.json()["metrics"]["plan"]["objective"] == "energy"
    assert client.post("/nowhere", content=b"{}").status_code == 404


def test_metrics_and_on_reply(client, replies):
    _embed(client, {"model": "tiny-embed", "input": "count me"})
    _embed(client, {"model": "gpt-4", "input": "refuse me"})
    text = client.get("/metrics").text
    assert 'edgeprism_http_requests_total{endpoint="/v1/embeddings",status="200"}' in text
    assert 'edgeprism_http_requests_total{endpoint="/v1/embeddings",status="404"}' in text
    assert "# TYPE edgeprism_request_latency_seconds histogram" in text
    assert 'edgeprism_request_latency_seconds_bucket{mode="local",le="+Inf"}' in text
    assert 'edgeprism_batch_rows_bucket{le="1"}' in text and "edgeprism_batch_requests_count" in text
    assert "edgeprism_cluster_members 1" in text and "edgeprism_engine_calls_total" in text
    assert "edgeprism_bytes_exchanged_total" in text
    served = [r for r in replies if r["endpoint"] == "/v1/embeddings" and r["status"] == 200]
    refused = [r for r in replies if r["endpoint"] == "/v1/embeddings" and r["status"] == 404]
    assert served and served[-1]["metrics"]["mode"] == "local" and refused and "gpt-4" in refused[-1]["error"]


def test_cluster_endpoint(client):
    status = client.get("/v1/cluster").json()
    assert status["model"] == MODEL and status["members"] == [0] and status["ranks"][0]["state"] == "serving"
    assert status["link"]["bandwidth_bps"] > 0


def test_an_engine_failure_is_a_counted_500(io):
    with launch_local(1, MODEL, synthetic_profile(MODEL, world_size=1)) as engine:
        app = make_app(engine, io)
        with TestClient(app) as client:
            assert _embed(client, {"model": MODEL, "input": "fine"}).status_code == 200
            engine.close()  # the engine is gone: its calls raise RuntimeError
            reply = _embed(client, {"model": MODEL, "input": "too late"})
            assert reply.status_code == 500
            error = reply.json()["error"]
            assert error["type"] == "server_error" and "closed" in error["message"]
            assert 'edgeprism_errors_total{endpoint="/v1/embeddings"} 1' in client.get("/metrics").text


def test_config_is_checked_against_the_engine(engine, io):
    with pytest.raises(ValueError, match="max_batch 64 exceeds the engine's max batch 32"):
        make_app(engine, io, ApiConfig(max_batch=64))
    with pytest.raises(ValueError, match="max_texts 9 exceeds max_batch 8"):
        ApiConfig(max_batch=8, max_texts=9)
    with pytest.raises(ValueError, match="batch_window_s -1"):
        ApiConfig(batch_window_s=-1)
