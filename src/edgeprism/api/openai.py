"""The OpenAI-compatible endpoints (/v1/embeddings, /v1/completions, /v1/models) and /v1/classify.

Each handler reads and checks the request at the edge (4xx errors naming the numbers), turns it
into engine jobs through the model adapter (`ModelIOLike`), awaits them on the engine thread, and
returns `(payload, results)`; `ApiService.answer` adds the `edgeprism` key, the plan header and the
counting. Tokenizing, decoding images and reading outputs run in Starlette's thread pool, so the event
loop keeps accepting requests.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from typing import Any

import torch
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from edgeprism.api.batching import Job, JobResult
from edgeprism.api.errors import bad_request
from edgeprism.api.guard import guarded_labels
from edgeprism.api.reading import boolean, check_keys, integer, read_images, read_json_object, string_list
from edgeprism.api.service import ApiService
from edgeprism.runtime.requests import check_inputs

EMBEDDING_KEYS = {"model", "input", "encoding_format", "dimensions", "user", "labels"}
COMPLETION_KEYS = {"model", "prompt", "max_tokens", "temperature", "n", "stream", "echo", "user"}
CLASSIFY_FIELDS = {"model", "top_k"}


# --- /v1/models ---
def model_card(service: ApiService) -> dict[str, Any]:
    config = service.engine.model.config
    io = service.io
    return {"id": service.model_name, "object": "model", "created": service.started_at, "owned_by": "edgeprism",
            "edgeprism": {"architecture": config.name, "family": config.family, "task": io.task if io else None,
                          "max_tokens": io.max_tokens if io else (config.max_positions or None),
                          "world_size": service.engine.ctx.world_size, "max_batch": service.config.max_batch,
                          "dynamic_batching": service.config.dynamic_batching}}


async def list_models(service: ApiService, request: Request, request_id: str):
    return {"object": "list", "data": [model_card(service)]}, []


async def get_model(service: ApiService, request: Request, request_id: str):
    service.check_model(request.path_params["model"])
    return model_card(service), []


async def _checked_body(service: ApiService, request: Request, keys, task: str, what: str):
    """(the request's JSON object, the model's IO): the body read within the size bound, its keys and model
    checked, and the IO that serves `task` (a 4xx naming the problem otherwise)."""
    body = await read_json_object(request, service.config.max_body_bytes)
    check_keys(body, keys, what)
    service.check_model(body.get("model"))
    return body, service.require_io(task, what)


# --- /v1/embeddings ---
async def embeddings(service: ApiService, request: Request, request_id: str):
    config = service.config
    body, io = await _checked_body(service, request, EMBEDDING_KEYS, "text-encoder", "POST /v1/embeddings")
    texts = string_list(body, "input", config.max_texts)
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad_request(f"'encoding_format' must be 'float' or 'base64', got {encoding!r}", "invalid_value",
                          param="encoding_format")
    want_labels = boolean(body, "labels", False)
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)):
        raise bad_request(f"'dimensions' must be an integer, got {dimensions!r}", "invalid_type", param="dimensions")
    inputs = await run_in_threadpool(_encode_texts, service, texts)
    engine = service.engine
    result = await service.run(Job(("encode",), inputs, lambda x, rid: engine.infer(x, request_id=rid), request_id,
                                   merge="pad"))
    vectors = await run_in_threadpool(io.embeddings, result.outputs, result.inputs)  # (n, d)
    if dimensions is not None and dimensions != vectors.shape[-1]:
        raise bad_request(f"'dimensions' {dimensions!r}: {service.model_name} gives {vectors.shape[-1]}-dimensional "
                          f"embeddings and does not shorten them", "invalid_value", param="dimensions")
    labels, rerun, results = None, [], [result]
    if want_labels:
        guarded = await guarded_labels(service, result, config.top_k, ("encode",), merge="pad")
        labels, rerun, results = guarded.labels, guarded.rerun_rows, guarded.results
        if rerun:  # the rows answered again on one device: their embeddings too
            vectors = await run_in_threadpool(io.embeddings, guarded.outputs, result.inputs)
    data = []
    for index, vector in enumerate(vectors.detach().to("cpu", torch.float32)):
        item: dict[str, Any] = {"object": "embedding", "index": index, "embedding": _vector(vector, encoding)}
        if want_labels:  # null where the model has no classifier
            item["labels"] = _labels(labels[index]) if labels is not None else None
        if index in rerun:
            item["near_tie_rerun"] = True
        data.append(item)
    tokens = _token_count(result.inputs)
    return {"object": "list", "data": data, "model": service.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, results


def _encode_texts(service: ApiService, texts: list[str]) -> dict[str, torch.Tensor]:
    assert service.io is not None
    try:
        inputs = service.io.encode_texts(texts)
        check_inputs(inputs, service.config.max_batch)
        service.engine.model.validate_input(inputs)
    except ValueError as err:
        raise bad_request(str(err), "invalid_input", param="input") from None
    return inputs


def _vector(vector: torch.Tensor, encoding: str) -> list[float] | str:
    values = vector.tolist()
    if encoding == "base64":  # OpenAI's: little-endian float32, base64
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
    return values


def _labels(pairs: list[tuple[str, float]]) -> list[dict[str, Any]]:
    return [{"label": label, "score": float(score)} for label, score in pairs]


def _token_count(inputs: dict[str, torch.Tensor]) -> int:
    if "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    return int(inputs["input_ids"].numel())


# --- /v1/completions ---
async def completions(service: ApiService, request: Request, request_id: str):
    config = service.config
    body, io = await _checked_body(service, request, COMPLETION_KEYS, "text-decoder", "POST /v1/completions")
    prompts = string_list(body, "prompt", config.max_texts)
    max_new_tokens = integer(body, "max_tokens", 16, 1, config.max_completion_tokens)
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or temperature != 0):
        raise bad_request(f"this server decodes greedily: give 'temperature' 0 or leave it out (got {temperature!r})",
                          "unsupported_value", param="temperature")
    for key, wanted in (("n", 1), ("stream", False), ("echo", False)):
        if body.get(key) is not None and body[key] != wanted:
            raise bad_request(f"'{key}' must be {str(wanted).lower()} here (got {body[key]!r})", "unsupported_value",
                              param=key)
    generate = service.engine.generate
    groups = await run_in_threadpool(_encode_prompts, service, prompts, max_new_tokens)
    jobs = [Job(("generate", length, max_new_tokens), {"input_ids": ids},
                lambda x, rid: generate(x, max_new_tokens, request_id=rid),
                request_id if len(groups) == 1 else f"{request_id}.{n}")
            for n, (length, (ids, _)) in enumerate(sorted(groups.items()))]
    results: list[JobResult] = list(await asyncio.gather(*(service.run(job) for job in jobs)))
    choices: list[dict[str, Any] | None] = [None] * len(prompts)
    completion_tokens = 0
    for (_length, (_, indices)), result in zip(sorted(groups.items()), results):
        for row, index in enumerate(indices):
            tokens = result.outputs["tokens"][row].tolist()
            finish = "length"
            if io.eos_token_id is not None and io.eos_token_id in tokens:
                tokens = tokens[:tokens.index(io.eos_token_id)]
                finish = "stop"
            completion_tokens += len(tokens) + (finish == "stop")
            choices[index] = {"text": io.decode_tokens(tokens), "index": index, "logprobs": None,
                              "finish_reason": finish}
    prompt_tokens = sum(length * len(indices) for length, (_, indices) in groups.items())
    return {"id": f"cmpl-{request_id}", "object": "text_completion", "created": int(time.time()),
            "model": service.model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}, results


def _encode_prompts(service: ApiService, prompts: list[str], max_new_tokens: int):
    """Prompts grouped by token count: length → ((k, length) ids, prompt indices). Equal lengths share a call."""
    assert service.io is not None
    config = service.engine.model.config
    try:
        encoded = service.io.encode_prompts(prompts)
    except ValueError as err:
        raise bad_request(str(err), "invalid_input", param="prompt") from None
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(encoded):
        if not ids:
            raise bad_request(f"prompt {index} encodes to no tokens", "invalid_value", param="prompt")
        if len(ids) + max_new_tokens > config.max_positions:
            raise bad_request(f"prompt {index} has {len(ids)} tokens and asks for {max_new_tokens} more; "
                              f"{service.model_name} takes {config.max_positions} positions in all",
                              "context_length_exceeded", param="max_tokens")
        by_length.setdefault(len(ids), []).append(index)
    groups = {}
    for length, indices in by_length.items():
        ids = torch.tensor([encoded[i] for i in indices], dtype=torch.int64)  # (k, length)
        try:
            service.engine.model.validate_input({"input_ids": ids})
        except ValueError as err:
            raise bad_request(str(err), "invalid_input", param="prompt") from None
        groups[length] = (ids, indices)
    return groups


# --- /v1/classify ---
async def classify(service: ApiService, request: Request, request_id: str):
    config = service.config
    io = service.require_io("image-encoder", "POST /v1/classify")
    blobs, fields = await read_images(request, config.max_body_bytes, config.max_texts)
    check_keys(fields, CLASSIFY_FIELDS, "POST /v1/classify")
    service.check_model(fields.get("model"), required=False)
    try:
        top_k = int(fields.get("top_k", config.top_k))
    except ValueError:
        raise bad_request(f"'top_k' must be an integer, got {fields['top_k']!r}", "invalid_type",
                          param="top_k") from None
    if not 1 <= top_k <= 100:
        raise bad_request(f"'top_k' {top_k} must be between 1 and 100", "invalid_value", param="top_k")
    if len(blobs) > config.max_texts:
        raise bad_request(f"{len(blobs)} images; this server takes at most {config.max_texts} per request",
                          "too_many_inputs", param="file")
    inputs = await run_in_threadpool(_encode_images, service, blobs)
    engine = service.engine
    shape = tuple(inputs["pixel_values"].shape[1:])
    result = await service.run(Job(("image", shape), inputs, lambda x, rid: engine.infer(x, request_id=rid),
                                   request_id))
    guarded = await guarded_labels(service, result, top_k, ("image", shape))
    data: list[dict[str, Any]] = []
    if guarded.labels is not None:
        data = [{"object": "classification", "index": i, "labels": _labels(pairs),
                 **({"near_tie_rerun": True} if i in guarded.rerun_rows else {})}
                for i, pairs in enumerate(guarded.labels)]
    else:
        vectors = io.embeddings(result.outputs, result.inputs).detach().to("cpu", torch.float32)
        data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
    return ({"object": "list", "data": data, "model": service.model_name, "usage": {"images": len(blobs)}},
            guarded.results)


def _encode_images(service: ApiService, blobs: list[bytes]) -> dict[str, torch.Tensor]:
    assert service.io is not None
    try:
        inputs = service.io.encode_images(blobs)
    except ValueError as err:
        raise bad_request(str(err), "invalid_image", param="file") from None
    try:
        check_inputs(inputs, service.config.max_batch)
        service.engine.model.validate_input(inputs)
    except ValueError as err:
        raise bad_request(str(err), "invalid_input", param="file") from None
    return inputs


__all__ = ["classify", "completions", "embeddings", "get_model", "list_models", "model_card"]
