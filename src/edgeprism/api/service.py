"""What every endpoint shares: the engine, the model adapter, the batcher, the metrics, and the way an
answer is made (the `edgeprism` key, the `X-Edgeprism-Plan` header, counting, `on_reply`)."""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from edgeprism.api.batching import Batcher, BatcherClosed, CallReport, Job, JobResult
from edgeprism.api.config import ApiConfig
from edgeprism.api.errors import ApiError, bad_request, engine_failure
from edgeprism.api.model_io import ModelIOLike, Task
from edgeprism.api.prometheus import BATCH_BUCKETS, LATENCY_BUCKETS_S, ApiMetrics
from edgeprism.api.store_watch import StoreWatch

log = logging.getLogger(__name__)

PLAN_HEADER = "X-Edgeprism-Plan"
ENGINE_ENDPOINTS = ("/v1/embeddings", "/v1/completions", "/v1/classify", "/infer")
"""Endpoints whose answers (served or refused) `on_reply` hears of; status endpoints are not reported."""
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

Handler = Callable[[Request, str], Awaitable[tuple[dict[str, Any], list[JobResult]]]]


class ApiService:
    """One served model: `engine` (rank 0), `io` (None: only /infer and the status endpoints), `config`
    (resolved against the engine), the batcher and the metrics. `on_reply` gets a compact record of
    every answer of an engine endpoint (ENGINE_ENDPOINTS): `{"id", "endpoint", "status", "metrics"}`
    (the first engine call's MetricsRow as a dict) or `{"id", "endpoint", "status", "error"}` (a string)."""

    def __init__(self, engine, io: ModelIOLike | None, config: ApiConfig,
                 on_reply: Callable[[dict], None] | None = None) -> None:
        self.engine = engine
        self.io = io
        self.config = config.resolved(engine.config.max_batch, engine.model.config.name)
        self.on_reply = on_reply
        self.started_at = int(time.time())
        self.metrics = ApiMetrics(self._gauges)
        self.batcher = Batcher(self.config.max_batch, self.config.batch_window_s, self.config.dynamic_batching,
                               engine.model.config.pad_token_id, on_call=self._on_call)
        self._ids = itertools.count(1)
        address = getattr(engine, "address", None)  # the store rank 0 hosts (None: a torchrun job's store)
        self.store_watch = (StoreWatch(address, self.config.store_watch_s, self.config.store_stall_s)
                            if address and self.config.store_watch_s > 0 else None)
        """Probes the rendezvous store for /metrics (started and stopped with the app)."""
        if io is not None and io.max_tokens > engine.model.config.max_positions > 0:
            log.warning("the model adapter allows %d tokens but %s has %d positions; longer texts will be refused",
                        io.max_tokens, engine.model.config.name, engine.model.config.max_positions)

    @property
    def model_name(self) -> str:
        assert self.config.model_name is not None  # resolved
        return self.config.model_name

    # --- checks shared by the endpoints ---
    def request_id(self, request: Request) -> str:
        given = request.headers.get("x-request-id", "")
        return given if _CLIENT_ID.fullmatch(given) else f"api{next(self._ids)}"

    def require_io(self, task: Task, endpoint: str) -> ModelIOLike:
        if self.io is None:
            raise bad_request(f"{endpoint} needs a tokenizer or image processor for {self.model_name}; this server "
                              f"was started without one (POST /infer takes tensors)", "unsupported_endpoint")
        if self.io.task != task:
            hint = {"text-encoder": "POST /v1/embeddings", "image-encoder": "POST /v1/classify",
                    "text-decoder": "POST /v1/completions"}[self.io.task]
            raise bad_request(f"{self.model_name} is a {self.io.task}: {endpoint} is for a {task}; use {hint}",
                              "unsupported_endpoint")
        return self.io

    def check_model(self, model: Any, required: bool = True) -> None:
        if model is None and not required:
            return
        if model is None:
            raise bad_request(f"'model' is required; this server serves {self.model_name!r}", "missing_parameter",
                              param="model")
        if not isinstance(model, str):
            raise bad_request(f"'model' must be a string, got {model!r}", "invalid_type", param="model")
        if model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist here; this server serves {self.model_name!r}",
                           "model_not_found", type="not_found_error", param="model")

    async def run(self, job: Job) -> JobResult:
        """Run a job through the batcher; the engine's ValueError is the request's 400, anything else a 500."""
        try:
            return await self.batcher.submit(job)
        except ValueError as err:
            raise bad_request(str(err), "invalid_input") from None
        except BatcherClosed as err:
            raise ApiError(503, str(err), "shutting_down", type="server_error") from None
        except Exception as err:
            raise engine_failure(err) from err

    # --- answers ---
    async def answer(self, endpoint: str, request: Request, handler: Handler, native: bool = False) -> Response:
        """Run `handler` and make the response: the payload with the `edgeprism` key and the plan header,
        or the error; count it and tell `on_reply`. `native`: POST /infer's format, where every answer
        (errors too) carries the id the request gave itself."""
        start = time.monotonic()
        request_id = self.request_id(request)
        results: list[JobResult] = []
        try:
            payload, results = await handler(request, request_id)
            if native:
                request_id = str(payload.get("id", request_id))
            if results:
                payload["edgeprism"] = edgeprism_summary(results, request_id)
            headers = {"X-Request-Id": request_id}
            if results:
                headers[PLAN_HEADER] = plan_header(results[0])
            response: Response = JSONResponse(payload, headers=headers)
            record: dict[str, Any] = {"metrics": results[0].metrics.to_dict()} if results else {}
        except ApiError as err:
            if err.status >= 500:
                self.metrics.inc("edgeprism_errors_total", endpoint=endpoint)
                log.warning("request %s on %s: %s", request_id, endpoint, err.message)
            else:
                log.info("request %s on %s refused: %s", request_id, endpoint, err.message)
            if native:
                request_id = err.request_id or request_id
            response = err.response({"id": request_id} if native else None)
            response.headers["X-Request-Id"] = request_id
            record = {"error": err.message}
        except Exception as err:  # a bug or an adapter failing unexpectedly: a 500 with the reason, counted
            log.exception("request %s on %s failed", request_id, endpoint)
            failure = ApiError(500, f"internal error: {type(err).__name__}: {err}", "internal_error",
                               type="server_error")
            self.metrics.inc("edgeprism_errors_total", endpoint=endpoint)
            response = failure.response({"id": request_id} if native else None)
            record = {"error": failure.message}
        self.metrics.inc("edgeprism_http_requests_total", endpoint=endpoint, status=str(response.status_code))
        if results:
            self.metrics.observe("edgeprism_request_latency_seconds", time.monotonic() - start, LATENCY_BUCKETS_S,
                                 mode=results[0].metrics.mode)
        if self.on_reply is not None and endpoint in ENGINE_ENDPOINTS:
            try:
                self.on_reply({"id": request_id, "endpoint": endpoint, "status": response.status_code, **record})
            except Exception:
                log.exception("on_reply failed for request %s", request_id)
        return response

    # --- metrics ---
    def _on_call(self, report: CallReport) -> None:
        m = self.metrics
        m.observe("edgeprism_batch_rows", report.rows, BATCH_BUCKETS)
        m.observe("edgeprism_batch_requests", report.requests, BATCH_BUCKETS)
        row = report.metrics
        if row is None:
            m.inc("edgeprism_engine_calls_total", mode="error")
            return
        m.inc("edgeprism_engine_calls_total", mode=row.mode)
        m.observe("edgeprism_engine_latency_seconds", row.latency_s, LATENCY_BUCKETS_S, mode=row.mode)
        m.inc("edgeprism_bytes_exchanged_total", row.bytes_exchanged)
        if row.fallback:
            m.inc("edgeprism_fallbacks_total")

    def _gauges(self) -> dict[str, tuple[str, float]]:
        engine = self.engine
        return {
            "edgeprism_cluster_members": ("Ranks the current epoch connects (rank 0 included).",
                                          len(engine.healthy_ranks)),
            "edgeprism_cluster_world_size": ("Ranks the engine was started with.", engine.ctx.world_size),
            "edgeprism_engine_failures": ("Distributed requests and probes that failed since start (engine.failures).",
                                          engine.failures),
            "edgeprism_queue_depth": ("Requests waiting for the engine thread.", self.batcher.depth),
            **{f"edgeprism_{name}": (SECURITY_HELP[name], value) for name, value in engine.security_counts().items()},
            **(self.store_watch.gauges() if self.store_watch is not None else {}),
        }


SECURITY_HELP = {
    "refused_joins": "Join requests refused since start (wrong or no secret, replayed, different start).",
    "skipped_join_slots": "Join slots taken but never written, or jumped over, on the store (not by a device).",
    "restored_store_keys": "Published store keys (boot nonce, cluster spec) found changed and written back.",
    "tampered_lane_messages": "Distributed requests failed by a lane message that did not open (sender dropped).",
    "sealed_lanes": "1 when every data-lane message is sealed (docs/SECURITY.md), else 0.",
}


def edgeprism_summary(results: list[JobResult], request_id: str) -> dict[str, Any]:
    """The `edgeprism` key of an answer: the plan and measurements of the engine call that served it
    (`calls`, one per call, when a request needed several, e.g. completions of unequal prompt lengths)."""
    calls = [_call_summary(r) for r in results]
    if len(calls) == 1:
        return {"request_id": request_id, **calls[0]}
    return {"request_id": request_id, "calls": calls}


def _call_summary(r: JobResult) -> dict[str, Any]:
    m, plan = r.metrics, r.metrics.plan
    return {
        "engine_request_id": m.request_id, "mode": m.mode, "ranks": list(plan.get("ranks", [0])),
        "codec": plan.get("codec") or None, "cr": plan.get("cr"), "objective": plan.get("objective"),
        "predicted_latency_ms": round(m.predicted_latency_s * 1e3, 3), "latency_ms": round(m.latency_s * 1e3, 3),
        "queue_ms": round(r.queue_s * 1e3, 3), "predicted_energy_j": m.predicted_energy_j, "energy_j": m.energy_j,
        "energy_source": m.energy_source, "bytes_exchanged": m.bytes_exchanged, "num_tokens": m.num_tokens,
        "rows": next(iter(r.inputs.values())).shape[0], "batch_rows": r.batch_rows, "batched_with": r.batched_with,
        "fallback": m.fallback or None, "reason": plan.get("reason"), "fidelity_loss": m.fidelity_loss,
    }


def plan_header(r: JobResult) -> str:
    """`distributed ranks=0,1 codec=sm16 latency_ms=12.3 predicted_ms=10.1 batch=4/2` (rows/requests)."""
    m, plan = r.metrics, r.metrics.plan
    parts = [m.mode, "ranks=" + ",".join(str(rank) for rank in plan.get("ranks", [0]))]
    if plan.get("codec"):
        parts.append(f"codec={plan['codec']}")
    parts += [f"latency_ms={m.latency_s * 1e3:.2f}", f"predicted_ms={m.predicted_latency_s * 1e3:.2f}",
              f"batch={r.batch_rows}/{r.batched_with}"]
    if m.fallback:
        parts.append("fallback=1")
    return " ".join(parts)


__all__ = ["PLAN_HEADER", "ApiService", "edgeprism_summary", "plan_header"]
