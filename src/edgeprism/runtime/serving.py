"""Serving requests to an engine: JSON in, one JSON answer out, a bad request never stops the next one.

`answer` turns one request (text or decoded JSON) into `{"id", "outputs", "metrics"}` or
`{"id", "error"}`; `serve_lines` runs it over a stream of lines (`edgeprism serve --input`), one at a
time, in arrival order. Over HTTP, the same requests are POST /infer of the API in `edgeprism.api`
(`serve_http`), which serves concurrent clients and batches them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal

from torch import Tensor

from edgeprism.runtime.requests import load_request_json, parse_request, request_id_of

log = logging.getLogger(__name__)

OutputsMode = Literal["summary", "full", "none"]


def format_outputs(outputs: dict[str, Tensor], mode: OutputsMode) -> dict[str, Any] | None:
    """summary: each output's shape (and per-row argmax of logits); full: the values as nested lists."""
    if mode == "none":
        return None
    formatted: dict[str, Any] = {}
    for key, tensor in outputs.items():
        tensor = tensor.detach().to("cpu")
        if mode == "full":
            formatted[key] = tensor.tolist()
            continue
        entry: dict[str, Any] = {"shape": list(tensor.shape)}
        if key == "logits":
            entry["argmax"] = tensor.argmax(-1).tolist()
        formatted[key] = entry
    return formatted


def answer(engine, request: str | bytes | dict, fallback_id: str, outputs: OutputsMode = "summary") -> dict[str, Any]:
    """Serve one request. A user's mistake (malformed JSON, wrong shape or dtype, NaN, batch too large,
    unknown objective) becomes `{"id", "error"}`; anything else (a lost worker) propagates."""
    raw: Any = None
    try:
        raw = load_request_json(request) if isinstance(request, (str, bytes)) else request
        parsed = parse_request(raw, engine.model.config, engine.config.max_batch, fallback_id)
        result = engine.infer(parsed.inputs, parsed.objective, parsed.limits, request_id=parsed.request_id)
    except ValueError as err:
        request_id = request_id_of(raw, fallback_id)
        log.info("request %s refused: %s", request_id, err)
        return {"id": request_id, "error": str(err)}
    return {"id": result.request_id, "outputs": format_outputs(result.outputs, outputs),
            "metrics": result.metrics.to_dict()}


def serve_lines(engine, lines: Iterable[str], write: Callable[[dict], None], outputs: OutputsMode = "summary",
                ) -> tuple[int, int]:
    """Answer each non-blank line; returns (served, refused)."""
    served = refused = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        reply = answer(engine, line, fallback_id=f"line{number}", outputs=outputs)
        if "error" in reply:
            refused += 1
        else:
            served += 1
        write(reply)
    return served, refused


__all__ = ["OutputsMode", "answer", "format_outputs", "serve_lines"]
