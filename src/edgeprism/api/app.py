"""The HTTP API: `make_app(engine, io, config)` (a Starlette app) and `serve_http(...)` (uvicorn).

Why Starlette + uvicorn: ASGI is the Python standard for concurrent HTTP servers, Starlette is a small
toolkit over it (routing, requests, multipart, a TestClient) with no pydantic or code generation, and
uvicorn is its reference server. The engine's calls block, so they run on one dedicated thread
(`api.batching.Batcher`); the event loop keeps accepting, reading and validating requests while the
engine works, and requests that arrive together are merged into one engine call.

Endpoints (docs/API.md): OpenAI-compatible POST /v1/embeddings, POST /v1/completions, GET /v1/models;
POST /v1/classify for images; POST /infer for the tensor-JSON requests of `edgeprism.runtime.requests`;
GET /health, GET /metrics (Prometheus text), GET /v1/cluster. Every answer that ran the engine carries
its plan and measurements under `edgeprism` and in the `X-Edgeprism-Plan` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from edgeprism.api import openai
from edgeprism.api.auth import BearerAuth, HttpAccess, check_exposure, load_api_key
from edgeprism.api.batching import Job
from edgeprism.api.config import ApiConfig
from edgeprism.api.errors import ApiError
from edgeprism.api.model_io import ModelIOLike
from edgeprism.api.reading import parse_json_object, read_body
from edgeprism.api.service import ApiService
from edgeprism.runtime.requests import MAX_REQUEST_BYTES, parse_request, request_id_of
from edgeprism.runtime.serving import format_outputs

log = logging.getLogger(__name__)


def make_app(engine, io: ModelIOLike | None, config: ApiConfig = ApiConfig(),
             on_reply: Callable[[dict], None] | None = None, access: HttpAccess = HttpAccess()) -> Starlette:
    """The API over `engine` (rank 0 of a running engine). `io` turns texts / images into inputs and
    outputs into answers (None: only /infer and the status endpoints). The engine thread starts with
    the first request and stops at the app's shutdown; `app.state.service` holds the batcher and metrics.
    `access.api_key_file`: every path but /health (and /metrics when `metrics_open`) needs the key (api.auth)."""
    service = ApiService(engine, io, config, on_reply)
    key = load_api_key(access.api_key_file) if access.api_key_file is not None else None

    def route(path: str, endpoint: str, handler, methods: list[str], native: bool = False) -> Route:
        async def handle(request: Request) -> Response:
            return await service.answer(endpoint, request, lambda r, rid: handler(service, r, rid), native)

        return Route(path, handle, methods=methods)

    async def metrics(request: Request) -> Response:
        service.metrics.inc("edgeprism_http_requests_total", endpoint="/metrics", status="200")
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        service.batcher.start()
        if service.store_watch is not None:
            service.store_watch.start()
        try:
            yield
        finally:
            if service.store_watch is not None:
                service.store_watch.stop()
            await run_in_threadpool(service.batcher.close)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = (f"no {request.method} {request.url.path}; see GET /v1/models, POST /v1/embeddings, "
                   f"/v1/completions, /v1/classify, /infer" if exc.status_code in (404, 405) else str(exc.detail))
        service.metrics.inc("edgeprism_http_requests_total", endpoint="other", status=str(exc.status_code))
        return ApiError(exc.status_code, message, code,
                        type="not_found_error" if exc.status_code == 404 else "invalid_request_error").response()

    routes = [
        route("/v1/embeddings", "/v1/embeddings", openai.embeddings, ["POST"]),
        route("/v1/completions", "/v1/completions", openai.completions, ["POST"]),
        route("/v1/classify", "/v1/classify", openai.classify, ["POST"]),
        route("/v1/models", "/v1/models", openai.list_models, ["GET"]),
        route("/v1/models/{model:path}", "/v1/models", openai.get_model, ["GET"]),
        route("/infer", "/infer", infer, ["POST"], native=True),
        route("/health", "/health", health, ["GET"]),
        route("/v1/cluster", "/v1/cluster", cluster, ["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    def refused(path: str, code: str) -> None:
        service.metrics.inc("edgeprism_http_unauthorized_total", code=code)
        service.metrics.inc("edgeprism_http_requests_total", endpoint=path if path in known else "other", status="401")

    known = {r.path for r in routes}
    middleware = [Middleware(BearerAuth, key=key, open_paths=access.open_paths(), on_refused=refused)] if key else []
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error},
                    middleware=middleware)
    app.state.service = service
    return app


# --- the engine's own endpoints ---
async def infer(service: ApiService, request: Request, request_id: str):
    """POST /infer: one tensor-JSON request (edgeprism.runtime.requests), run alone (never merged)."""
    body = await read_body(request, min(service.config.max_body_bytes, MAX_REQUEST_BYTES))
    engine = service.engine

    def parse():  # in the thread pool: a large body builds large tensors
        raw = parse_json_object(body)
        own_id = request_id_of(raw, request_id)
        try:
            return parse_request(raw, engine.model.config, service.config.max_batch, own_id)
        except ValueError as err:
            raise ApiError(400, str(err), "invalid_input", request_id=own_id) from None

    parsed = await run_in_threadpool(parse)

    def run(inputs, engine_request_id):
        return engine.infer(inputs, parsed.objective, parsed.limits, request_id=parsed.request_id)

    try:
        result = await service.run(Job(None, parsed.inputs, run, parsed.request_id))
    except ApiError as err:
        err.request_id = parsed.request_id
        raise
    outputs = await run_in_threadpool(format_outputs, result.outputs, service.config.outputs_mode)
    return {"id": parsed.request_id, "outputs": outputs, "metrics": result.metrics.to_dict()}, [result]


async def health(service: ApiService, request: Request, request_id: str):
    engine = service.engine
    link = engine.link_estimate
    return {"ok": True, "model": service.model_name, "architecture": engine.model.config.name,
            "task": service.io.task if service.io else None, "world_size": engine.ctx.world_size,
            "healthy_ranks": list(engine.healthy_ranks), "failures": engine.failures,
            "queue_depth": service.batcher.depth, "link_bandwidth_bps": link.bandwidth_bps,
            "link_latency_s": link.latency_s}, []


async def cluster(service: ApiService, request: Request, request_id: str):
    return dict(await run_in_threadpool(service.engine.cluster_status)), []


# --- running it ---
def serve_http(engine, io: ModelIOLike | None, host: str = "127.0.0.1", port: int = 8000,
               config: ApiConfig = ApiConfig(), on_reply: Callable[[dict], None] | None = None,
               on_ready: Callable[[str, int], None] | None = None, stop: threading.Event | None = None,
               access: HttpAccess = HttpAccess()) -> None:
    """Serve the API with uvicorn on host:port until Ctrl-C (SIGINT), SIGTERM or `stop` is set, then
    return (after the requests in progress are answered). Prints nothing itself (uvicorn's log goes to
    the `uvicorn` loggers); `on_ready(host, port)` is called once it listens (the bound port when `port`
    is 0), `on_reply` after every answer (see ApiService). Signals are caught only on the main thread.
    `access`: the API key and TLS (api.auth); a ValueError, before anything listens, for an address off
    loopback with neither a key nor `access.insecure`."""
    try:
        import uvicorn
    except ImportError as err:
        raise ImportError("serve_http needs uvicorn: pip install 'edgeprism[serve]'") from err

    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} must be in 0..65535")
    check_exposure(host, port, access)
    app = make_app(engine, io, config, on_reply, access)  # a bad key file is named before anything listens
    uv_config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=30,
                               ssl_certfile=access.tls_cert_file, ssl_keyfile=access.tls_key_file)
    try:
        uv_config.load()  # reads the certificate and key now, so that a bad one is the caller's ValueError
    except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
        raise ValueError(f"cannot serve TLS with certificate {access.tls_cert_file} and key {access.tls_key_file}: "
                         f"{err}") from None
    sock = _bind(host, port)  # here, so that a port in use is the caller's ValueError, not uvicorn's exit
    server = uvicorn.Server(uv_config)

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started and on_ready is not None:
            bound = sock.getsockname()
            on_ready(bound[0], bound[1])
        while stop is not None and not task.done():
            if stop.is_set():
                server.should_exit = True
                break
            await asyncio.sleep(0.05)
        await task

    try:
        asyncio.run(run())
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it shut down for
        pass
    finally:
        sock.close()


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


__all__ = ["cluster", "health", "infer", "make_app", "serve_http"]
