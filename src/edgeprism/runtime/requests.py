"""Requests at the edge: parse JSON requests and check tensors before anything is planned or sent.

A request for `edgeprism serve` (one JSON object per line, or one HTTP POST body)::

    {"id": "r1", "model_input": {"input_ids": [[101, 2023, ...]], "attention_mask": [[1, 1, ...]]}}
    {"id": "r2", "model_input": {"pixel_values": [[[[0.1, ...], ...], ...]]}}      # (B, C, H, W)
    {"id": "r3", "synthetic": {"batch": 4, "seq_len": 64}}                         # seeded random input
    optional per request: "objective": "latency"|"energy"|"edp", "max_fidelity_loss": 0.02,
                          "max_latency_s": 0.5 (a request that sets either gets the default 1 % budget
                          where it gives no max_fidelity_loss; the server's opt-in to unmeasured codecs holds)

Model inputs may also sit at the top level ({"id": .., "input_ids": ..}). Everything a user can get
wrong is a ValueError naming the numbers; the engine answers that request with the error and serves
the next one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from edgeprism.models.base import Inputs
from edgeprism.models.config import ModelConfig
from edgeprism.plan.types import DEFAULT_MAX_FIDELITY_LOSS, OBJECTIVES, Limits

MAX_REQUEST_BYTES = 64 << 20
"""A request line or body larger than this is refused before it is parsed (64 MiB)."""

INTEGER_KEYS = ("input_ids", "attention_mask", "token_type_ids")
FLOAT_KEYS = ("pixel_values",)
_REQUEST_KEYS = {"id", "model_input", "synthetic", "objective", "max_fidelity_loss", "max_latency_s"}
_SYNTHETIC_KEYS = {"batch", "seq_len", "image_size", "padded", "seed"}


@dataclass(frozen=True)
class ParsedRequest:
    """A checked request: its id, its input tensors, and optional per-request objective and limits."""

    request_id: str
    inputs: Inputs = field(repr=False)
    objective: str | None = None
    limits: Limits | None = None


def request_id_of(raw: Any, fallback: str) -> str:
    """The id to answer with, even for a request too broken to parse."""
    if isinstance(raw, dict) and isinstance(raw.get("id"), (str, int)) and not isinstance(raw.get("id"), bool):
        return str(raw["id"])
    return fallback


def load_request_json(text: str | bytes) -> Any:
    if len(text) > MAX_REQUEST_BYTES:
        raise ValueError(f"request of {len(text):,} bytes exceeds the {MAX_REQUEST_BYTES:,}-byte limit")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"request is not valid JSON: {err}") from None
    except RecursionError:
        raise ValueError("request JSON is nested too deeply") from None


def parse_request(raw: Any, config: ModelConfig, max_batch: int, fallback_id: str = "") -> ParsedRequest:
    """A decoded JSON request → ParsedRequest (tensors built and checked with `check_inputs`)."""
    if not isinstance(raw, dict):
        raise ValueError(f"a request is a JSON object like {{\"id\": ..., \"model_input\": {{...}}}}, got "
                         f"{type(raw).__name__}")
    request_id = request_id_of(raw, fallback_id)
    model_keys = set(INTEGER_KEYS) | set(FLOAT_KEYS)
    unknown = set(raw) - _REQUEST_KEYS - model_keys
    if unknown:
        raise ValueError(f"request {request_id}: unknown keys {sorted(unknown)}; expected id, model_input or "
                         f"synthetic, and optionally objective, max_fidelity_loss, max_latency_s")
    top_level = {k: raw[k] for k in model_keys if k in raw}
    sources = [name for name, present in (("model_input", "model_input" in raw), ("synthetic", "synthetic" in raw),
                                          ("top-level inputs", bool(top_level))) if present]
    if len(sources) != 1:
        raise ValueError(f"request {request_id}: give exactly one of model_input, synthetic or top-level inputs; "
                         f"got {sources or 'none'}")
    if "synthetic" in raw:
        inputs = _synthetic(raw["synthetic"], config, max_batch)
    else:
        model_input = raw.get("model_input", top_level)
        if not isinstance(model_input, dict) or not model_input:
            raise ValueError(f"request {request_id}: model_input must be a non-empty object of named arrays")
        inputs = {key: _to_tensor(key, value) for key, value in model_input.items()}
    objective = raw.get("objective")
    if objective is not None and objective not in OBJECTIVES:
        raise ValueError(f"request {request_id}: objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    limits = None
    if raw.get("max_fidelity_loss") is not None or raw.get("max_latency_s") is not None:
        for key in ("max_fidelity_loss", "max_latency_s"):
            value = raw.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"request {request_id}: {key} must be a number, got {value!r}")
        budget = raw.get("max_fidelity_loss")
        limits = Limits(DEFAULT_MAX_FIDELITY_LOSS if budget is None else budget, raw.get("max_latency_s"))
    check_inputs(inputs, max_batch)
    return ParsedRequest(request_id, inputs, objective, limits)


def _synthetic(spec: Any, config: ModelConfig, max_batch: int) -> Inputs:
    from edgeprism.models.synthetic import synthetic_inputs

    if not isinstance(spec, dict) or set(spec) - _SYNTHETIC_KEYS:
        raise ValueError(f"synthetic takes an object with keys among {sorted(_SYNTHETIC_KEYS)}, got {spec!r}")
    ints = {}
    for key in ("batch", "seq_len", "image_size", "seed"):
        value = spec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"synthetic.{key} must be an integer, got {value!r}")
        ints[key] = value
    batch = 1 if ints["batch"] is None else ints["batch"]
    if not 1 <= batch <= max_batch:
        raise ValueError(f"synthetic batch {batch} must be between 1 and the engine's max batch {max_batch}")
    if config.modality == "image" and ints["seq_len"] is not None:
        raise ValueError(f"synthetic.seq_len is for text models; {config.name} is a ViT: use image_size")
    if config.modality != "image" and ints["image_size"] is not None:
        raise ValueError(f"synthetic.image_size is for ViT models; {config.name} is a text model: use seq_len")
    for key in ("seq_len", "image_size"):
        if ints[key] is not None and ints[key] < 1:
            raise ValueError(f"synthetic.{key} {ints[key]} must be >= 1")
    return synthetic_inputs(config, batch, seq_len=ints["seq_len"], image_size=ints["image_size"],
                            padded=bool(spec.get("padded", False)), seed=ints["seed"] or 0)


def _shape_of(value: Any, key: str) -> tuple[int, ...]:
    """Shape of a rectangular nested list, or a ValueError naming the first ragged place."""
    shape: list[int] = []
    level = [value]
    while level and isinstance(level[0], list):
        lengths = {len(v) if isinstance(v, list) else -1 for v in level}
        if len(lengths) != 1 or -1 in lengths:
            raise ValueError(f"{key} is ragged at depth {len(shape)}: its lists have lengths "
                             f"{sorted(x for x in lengths if x >= 0)}{' and non-lists' if -1 in lengths else ''}; "
                             f"pad rows to one length (and give attention_mask)")
        shape.append(lengths.pop())
        level = [item for v in level for item in v]
    if any(isinstance(v, list) for v in level):
        raise ValueError(f"{key} is ragged: lists and numbers mixed at depth {len(shape)}")
    return tuple(shape)


def _to_tensor(key: str, value: Any) -> Tensor:
    if key not in INTEGER_KEYS and key not in FLOAT_KEYS:
        raise ValueError(f"unknown model input {key!r}; known: {', '.join(INTEGER_KEYS + FLOAT_KEYS)}")
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a nested list of numbers, got {type(value).__name__}")
    shape = _shape_of(value, key)
    flat: list[Any] = [value]
    for _ in shape:
        flat = [item for v in flat for item in v]
    if key in INTEGER_KEYS:
        if any(isinstance(x, bool) or not isinstance(x, int) for x in flat):
            bad = next(x for x in flat if isinstance(x, bool) or not isinstance(x, int))
            raise ValueError(f"{key} must hold integers, found {bad!r}")
        if any(not -(1 << 62) < x < (1 << 62) for x in flat):
            raise ValueError(f"{key} holds an integer out of range")
        return torch.tensor(flat, dtype=torch.int64).reshape(shape)
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in flat):
        bad = next(x for x in flat if isinstance(x, bool) or not isinstance(x, (int, float)))
        raise ValueError(f"{key} must hold numbers, found {bad!r}")
    if not all(math.isfinite(x) for x in flat):
        raise ValueError(f"{key} holds NaN or infinite values; give finite numbers")
    return torch.tensor(flat, dtype=torch.float32).reshape(shape)


def check_inputs(inputs: Any, max_batch: int) -> int:
    """The engine-edge checks every request passes (JSON or Python API), before the model's own
    `validate_input`: a dict of tensors, finite floats, a batch of at most `max_batch`. Returns the batch."""
    if not isinstance(inputs, dict) or not inputs:
        raise ValueError(f"inputs must be a non-empty dict of tensors, got {type(inputs).__name__}")
    batch = None
    for key, value in inputs.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"input {key!r} is a {type(value).__name__}, not a torch.Tensor")
        if value.dim() == 0:
            raise ValueError(f"input {key!r} is a scalar; give a batch (batch, ...)")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            count = int((~torch.isfinite(value)).sum())
            raise ValueError(f"input {key!r} holds {count} NaN or infinite values; give finite numbers")
        if value.is_complex():
            raise ValueError(f"input {key!r} has complex dtype {value.dtype}")
        if batch is None:
            batch = value.shape[0]
        elif value.shape[0] != batch:
            raise ValueError(f"inputs disagree on the batch size: {key!r} has {value.shape[0]} rows, others {batch}")
    assert batch is not None
    if batch > max_batch:
        raise ValueError(f"batch of {batch} rows exceeds the engine's max batch {max_batch}; split the request")
    if batch < 1:
        raise ValueError("empty batch: inputs have 0 rows")
    return batch


__all__ = [
    "MAX_REQUEST_BYTES",
    "ParsedRequest",
    "check_inputs",
    "load_request_json",
    "parse_request",
    "request_id_of",
]
