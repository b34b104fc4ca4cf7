"""Dynamic batching over a real engine: merged rows answer as if alone (to 1e-5), a bad request in a
merged call fails alone, the off switch, and real uvicorn with 8 concurrent httpx clients (plus the load
generator) on 127.0.0.1 producing batches of more than one request."""

import asyncio
import json
import threading

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from api_adapters import WordIO  # noqa: E402
from edgeprism.api import ApiConfig, serve_http  # noqa: E402
from edgeprism.api.batching import Batcher, Job  # noqa: E402
from edgeprism.api.load import LoadConfig, run_load  # noqa: E402
from edgeprism.api.load import main as load_main  # noqa: E402
from edgeprism.plan.synthetic import synthetic_profile  # noqa: E402
from edgeprism.runtime import launch_local  # noqa: E402

MODEL = "bert-tiny-test"
TEXTS = ["the fox", "a cat sat on the mat", "each rank owns positions while codecs compress what crosses the link",
         "dog", "the quick brown fox jumps over the lazy dog", "edge devices"]


@pytest.fixture(scope="module")
def engine():
    with launch_local(1, MODEL, synthetic_profile(MODEL, world_size=1)) as engine:
        yield engine


@pytest.fixture(scope="module")
def io():
    return WordIO("text-encoder", MODEL, vocab_size=1000, max_tokens=64)


def _jobs(engine, io, texts, key=("encode",), prefix="r"):
    def run(inputs, request_id):
        return engine.infer(inputs, request_id=request_id)

    return [Job(key, io.encode_texts([text]), run, f"{prefix}{i}", merge="pad") for i, text in enumerate(texts)]


async def _submit_all(batcher, jobs):
    try:
        return await asyncio.gather(*(batcher.submit(job) for job in jobs), return_exceptions=True)
    finally:
        await asyncio.to_thread(batcher.close)


def test_merged_text_rows_equal_their_unbatched_answers(engine, io):
    batcher = Batcher(max_batch=32, window_s=0.5, pad_token_id=engine.model.config.pad_token_id)
    results = asyncio.run(_submit_all(batcher, _jobs(engine, io, TEXTS)))
    assert all(r.batched_with == len(TEXTS) and r.batch_rows == len(TEXTS) for r in results)
    assert len({r.metrics.request_id for r in results}) == 1  # one engine call
    longest = max(io.encode_texts([t])["input_ids"].shape[1] for t in TEXTS)
    assert results[0].metrics.num_tokens == longest  # padded to the longest row of the merged batch
    for text, result in zip(TEXTS, results):
        alone = engine.infer(io.encode_texts([text])).outputs
        for key in ("mean", "pooled", "cls"):
            assert result.outputs[key].shape == alone[key].shape == (1, 64)
            assert torch.allclose(result.outputs[key], alone[key], atol=1e-5), (text, key)


def test_a_bad_request_in_a_merged_call_fails_alone(engine, io):
    jobs = _jobs(engine, io, TEXTS[:3])
    jobs[1].inputs = {"input_ids": torch.tensor([[2, 99999, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    batcher = Batcher(max_batch=32, window_s=0.5)
    results = asyncio.run(_submit_all(batcher, jobs))
    assert isinstance(results[1], ValueError) and "vocabulary" in str(results[1])
    assert results[0].batched_with == results[2].batched_with == 1  # rerun alone
    assert torch.allclose(results[0].outputs["mean"], engine.infer(jobs[0].inputs).outputs["mean"], atol=1e-5)


def test_batches_respect_max_batch_kinds_and_the_off_switch(engine, io):
    batcher = Batcher(max_batch=4, window_s=0.5)
    jobs = _jobs(engine, io, TEXTS)  # 6 rows, at most 4 per call
    results = asyncio.run(_submit_all(batcher, jobs))
    assert sorted({r.batched_with for r in results}) == [2, 4]
    mixed = _jobs(engine, io, TEXTS[:2], key=("a",)) + _jobs(engine, io, TEXTS[2:4], key=("b",), prefix="s")
    results = asyncio.run(_submit_all(Batcher(max_batch=32, window_s=0.5), mixed))
    assert [r.batched_with for r in results] == [2, 2, 2, 2]
    assert results[0].metrics.request_id != results[2].metrics.request_id
    results = asyncio.run(_submit_all(Batcher(max_batch=32, window_s=0.5, enabled=False), _jobs(engine, io, TEXTS)))
    assert [r.batched_with for r in results] == [1] * len(TEXTS)
    assert [r.outputs["mean"].shape[0] for r in results] == [1] * len(TEXTS)


@pytest.fixture(scope="module")
def server(io):
    """Real uvicorn on 127.0.0.1 (a free port) over a two-rank engine, in a thread; stopped by an event."""
    with launch_local(2, MODEL, synthetic_profile(MODEL, world_size=2)) as engine:
        ready, stop, replies = threading.Event(), threading.Event(), []
        bound = {}

        def on_ready(host, port):
            bound["url"] = f"http://{host}:{port}"
            ready.set()

        config = ApiConfig(batch_window_s=0.2)
        thread = threading.Thread(target=serve_http, args=(engine, io, "127.0.0.1", 0, config),
                                  kwargs={"on_reply": replies.append, "on_ready": on_ready, "stop": stop}, daemon=True)
        thread.start()
        assert ready.wait(30), "uvicorn did not start"
        try:
            yield bound["url"], replies
        finally:
            stop.set()
            thread.join(30)
        assert not thread.is_alive()


def _batch_requests_over_one(metrics_text):
    """Engine calls that merged more than one request, from the edgeprism_batch_requests histogram."""
    buckets = {}
    for line in metrics_text.splitlines():
        if line.startswith("edgeprism_batch_requests_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets[le] = float(line.rsplit(" ", 1)[1])
    return buckets["+Inf"] - buckets["1"]


def test_concurrent_clients_on_uvicorn_are_batched(server):
    url, replies = server

    async def clients():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for _ in range(2):
                answers = await asyncio.gather(*(client.post("/v1/embeddings", json={"model": MODEL, "input": text})
                                                 for text in TEXTS + TEXTS[:2]))  # 8 concurrent clients
                assert [a.status_code for a in answers] == [200] * 8
                bad = await client.post("/v1/embeddings", json={"model": MODEL, "input": 7})
                assert bad.status_code == 400
            return answers, (await client.get("/metrics")).text

    answers, metrics = asyncio.run(clients())
    assert _batch_requests_over_one(metrics) >= 1
    assert max(a.json()["edgeprism"]["batched_with"] for a in answers) > 1
    assert "edgeprism_cluster_members 2" in metrics and "edgeprism_cluster_world_size 2" in metrics
    assert len([r for r in replies if r["endpoint"] == "/v1/embeddings"]) >= 18


def test_load_generator_against_uvicorn(server):
    url, _ = server
    report = asyncio.run(run_load(LoadConfig(url=url, endpoint="embeddings", concurrency=8, requests=24,
                                             synthetic_tokens=(4, 12), duration_s=60)))
    assert report.requests == report.ok == 24 and report.errors == 0
    assert report.throughput_rps > 0 and report.rows_per_s > 0
    assert report.latency_ms["p50"] <= report.latency_ms["p95"] <= report.latency_ms["p99"]
    assert report.batched_with_mean is not None and report.batched_with_mean >= 1


def test_load_generator_command_prints_one_json_report(server, capsys, tmp_path):
    url, _ = server
    assert load_main(["--url", url, "--endpoint", "infer", "--concurrency", "2", "--requests", "4",
                      "--synthetic-tokens", "8-16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] == 4 and report["endpoint"] == "infer" and set(report["latency_ms"]) >= {"p50", "p95", "p99"}
    texts = tmp_path / "texts.txt"
    texts.write_text("the fox\n\na cat sat\n")
    assert load_main(["--url", url, "--texts", str(texts), "--requests", "3", "--texts-per-request", "2"]) == 0
    assert "rows/s" in capsys.readouterr().out
    assert load_main(["--url", "file:///etc/passwd"]) == 2
