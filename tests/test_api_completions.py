"""POST /v1/completions over a real one-rank gpt2-tiny-test engine: greedy text equal to the reference
decoder, prompts of unequal length served in separate calls, equal lengths merged, finish reasons."""

import asyncio

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("tokenizers")

from starlette.testclient import TestClient

from api_adapters import WordIO
from edgeprism.api import ApiConfig, make_app
from edgeprism.api.batching import Batcher, Job
from edgeprism.models.gpt2 import greedy_generate
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.runtime import launch_local

MODEL = "gpt2-tiny-test"


@pytest.fixture(scope="module")
def engine():
    with launch_local(1, MODEL, synthetic_profile(MODEL, world_size=1)) as engine:
        yield engine


@pytest.fixture(scope="module")
def io():
    return WordIO("text-decoder", MODEL, vocab_size=1000, max_tokens=128)


@pytest.fixture(scope="module")
def client(engine, io):
    with TestClient(make_app(engine, io, ApiConfig(max_completion_tokens=32))) as client:
        yield client


def _reference(engine, io, prompt, max_new_tokens):
    ids = torch.tensor([io.encode_prompts([prompt])[0]])
    return greedy_generate(engine.model, {"input_ids": ids}, max_new_tokens)[0].tolist()


def test_completions_are_greedy_and_in_prompt_order(client, engine, io):
    prompts = ["the quick brown fox", "a cat", "the lazy dog"]  # lengths 4, 2, 3: three engine calls
    reply = client.post("/v1/completions", json={"model": MODEL, "prompt": prompts, "max_tokens": 5})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    for index, (prompt, choice) in enumerate(zip(prompts, body["choices"])):
        assert choice["index"] == index and choice["finish_reason"] == "length"
        assert choice["text"] == io.decode_tokens(_reference(engine, io, prompt, 5))
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 15, "total_tokens": 24}
    assert len(body["edgeprism"]["calls"]) == 3 and "x-edgeprism-plan" in reply.headers
    single = client.post("/v1/completions", json={"model": MODEL, "prompt": "the fox", "temperature": 0}).json()
    assert single["edgeprism"]["rows"] == 1 and single["usage"]["completion_tokens"] == 16  # OpenAI's default


def test_eos_stops_a_completion(engine):
    """An adapter whose end-of-text id is the first greedy token: the text is empty, finish_reason stop."""
    io = WordIO("text-decoder", MODEL, vocab_size=1000, max_tokens=128, eos=True)
    first = _reference(engine, io, "the fox", 1)[0]
    io.eos_token_id = first
    with TestClient(make_app(engine, io)) as client:
        choice = client.post("/v1/completions", json={"model": MODEL, "prompt": "the fox", "max_tokens": 4}).json()
    assert choice["choices"][0] == {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}
    assert choice["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("body, code", [
    ({"model": MODEL, "prompt": "a", "temperature": 0.7}, "unsupported_value"),
    ({"model": MODEL, "prompt": "a", "n": 2}, "unsupported_value"),
    ({"model": MODEL, "prompt": "a", "stream": True}, "unsupported_value"),
    ({"model": MODEL, "prompt": "a", "max_tokens": 0}, "invalid_value"),
    ({"model": MODEL, "prompt": "a", "max_tokens": 33}, "invalid_value"),  # over max_completion_tokens
    ({"model": MODEL, "prompt": "a", "max_tokens": "5"}, "invalid_type"),
    ({"model": MODEL, "prompt": " ".join(["fox"] * 120), "max_tokens": 16}, "context_length_exceeded"),
    ({"model": MODEL, "prompt": "a", "top_p": 0.5}, "unknown_parameter"),
])
def test_bad_completion_requests(client, body, code):
    reply = client.post("/v1/completions", json=body)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == code, reply.text
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1}).status_code == 200


def test_equal_length_prompts_share_one_generate_call(engine, io):
    prompts = ["the quick fox", "a lazy dog", "each rank owns"]  # three tokens each

    def run(inputs, request_id):
        return engine.generate(inputs, 4, request_id=request_id)

    jobs = [Job(("generate", 3, 4), {"input_ids": torch.tensor([io.encode_prompts([p])[0]])}, run, f"g{i}")
            for i, p in enumerate(prompts)]

    async def submit():
        batcher = Batcher(max_batch=8, window_s=0.5)
        try:
            return await asyncio.gather(*(batcher.submit(job) for job in jobs))
        finally:
            await asyncio.to_thread(batcher.close)

    results = asyncio.run(submit())
    assert [r.batched_with for r in results] == [3, 3, 3]
    for prompt, result in zip(prompts, results):
        assert result.outputs["tokens"][0].tolist() == _reference(engine, io, prompt, 4)
