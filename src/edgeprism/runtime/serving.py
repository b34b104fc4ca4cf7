"""Serving requests to an engine: JSON in, one JSON answer out, a bad request never stops the next one.

`answer` turns one request (text or decoded JSON) into `{"id", "outputs", "metrics"}` or
`{"id", "error"}`; `serve_lines` runs it over a stream of lines; `make_http_server` offers it as
`POST /infer` (plus `GET /health`) on a small single-threaded HTTP server, bound to 127.0.0.1 unless
told otherwise. Requests are served one at a time, in arrival order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Literal

from torch import Tensor

from edgeprism.runtime.requests import MAX_REQUEST_BYTES, load_request_json, parse_request, request_id_of

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


def make_http_server(engine, host: str = "127.0.0.1", port: int = 8000, outputs: OutputsMode = "summary",
                     on_reply: Callable[[dict], None] | None = None) -> HTTPServer:
    """An HTTP server (call `serve_forever()`; `server_address` has the bound port when `port` is 0)."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the endpoint has no authentication; anyone who can reach it can run requests",
                    host)
    counter = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path != "/health":
                self._send(404, {"error": f"no {self.path}; use POST /infer or GET /health"})
                return
            link = engine.link_estimate
            self._send(200, {"ok": True, "model": engine.model.config.name, "world_size": engine.ctx.world_size,
                             "link_bandwidth_bps": link.bandwidth_bps, "link_latency_s": link.latency_s})

        def do_POST(self) -> None:  # noqa: N802
            counter["n"] += 1
            fallback = f"http{counter['n']}"
            if self.path != "/infer":
                self._send(404, {"id": fallback, "error": f"no {self.path}; POST requests to /infer"})
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._send(411, {"id": fallback, "error": "a Content-Length header is required"})
                return
            if not 0 < length <= MAX_REQUEST_BYTES:
                self._send(413, {"id": fallback, "error": f"request body of {length} bytes; give 1 to "
                                                          f"{MAX_REQUEST_BYTES} bytes"})
                return
            reply = answer(engine, self.rfile.read(length), fallback, outputs)
            if on_reply is not None:
                on_reply(reply)
            self._send(400 if "error" in reply else 200, reply)

        def log_message(self, format: str, *args) -> None:  # route http.server's access log to logging
            log.debug("http %s: " + format, self.address_string(), *args)

    return HTTPServer((host, port), Handler)


__all__ = ["answer", "serve_lines", "make_http_server", "format_outputs", "OutputsMode"]
