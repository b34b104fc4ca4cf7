"""Dynamic batching: concurrent requests of the same kind share one engine call, on one engine thread.

The engine's calls block (and hold the engine's lock), so they all run on one dedicated thread; the
event loop only enqueues a `Job` and awaits its future, and keeps accepting and validating requests
meanwhile. The engine thread takes the oldest job, then, for `window_s` after that job arrived, takes
every queued job with the same `key` while the rows fit in `max_batch`; jobs of another kind wait for
the next call, in arrival order. Jobs that queued while the engine was busy merge at once, so under
load batches form without waiting. One engine call then serves the merged rows:

- `merge="pad"` (texts): inputs are right-padded to the longest row of the merged batch (pad id,
  attention_mask 0, token type 0). With the attention mask, each row's answer is its unbatched answer
  (tested to 1e-5 for a local plan; a lossy distributed codec compresses the padded batch, so its
  rows can differ from an unbatched run as they would between any two plans);
- `merge="stack"` (images of one size, completions of one prompt length and one `max_tokens`): the
  key holds the shape, inputs are concatenated along the batch.

Each caller gets its own rows of the outputs (and its own inputs back) with the shared metrics row,
the call's row count and `batched_with`, the number of requests merged. If a merged call raises
ValueError, each of its jobs is retried alone, so one bad request fails alone. `enabled=False`
serves one job per call, in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from edgeprism.runtime.metrics import MetricsRow, Result

log = logging.getLogger(__name__)

Inputs = dict[str, Tensor]
RunCall = Callable[[Inputs, str], Result]

_PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0}
"""Padding of the text inputs other than input_ids (which take the model's pad id)."""


class BatcherClosed(RuntimeError):
    """The server is shutting down: the job was not run."""


@dataclass(eq=False)
class Job:
    """One request's rows for the engine. Jobs with equal, non-None `key` may share a call (so `run`
    must be the same call for equal keys: put every argument of `run` in the key)."""

    key: tuple | None
    inputs: Inputs
    run: RunCall
    request_id: str
    merge: Literal["pad", "stack"] = "stack"
    arrived_s: float = field(default_factory=time.monotonic)
    _future: asyncio.Future | None = field(default=None, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return next(iter(self.inputs.values())).shape[0]


@dataclass(frozen=True)
class JobResult:
    """A job's own rows of the engine's outputs, its own inputs, and the call it was served in."""

    outputs: dict[str, Tensor]
    inputs: Inputs
    metrics: MetricsRow
    """The engine call's row (shared by every request merged into it; its request_id is the call's)."""
    batch_rows: int
    """Rows in the engine call."""
    batched_with: int
    """Requests merged into the engine call (1: served alone)."""
    queue_s: float
    """From the job's arrival to the start of its engine call."""


@dataclass(frozen=True)
class CallReport:
    """What the batcher tells its observer after every engine call (metrics)."""

    rows: int
    requests: int
    metrics: MetricsRow | None
    error: BaseException | None


class Batcher:
    """The engine thread and its queue. `submit` from the event loop; `close` on shutdown."""

    def __init__(self, max_batch: int, window_s: float, enabled: bool = True, pad_token_id: int = 0,
                 on_call: Callable[[CallReport], None] | None = None) -> None:
        if max_batch < 1 or window_s < 0:
            raise ValueError(f"max_batch {max_batch} must be >= 1 and window_s {window_s} >= 0")
        self.max_batch = max_batch
        self.window_s = window_s
        self.enabled = enabled
        self.pad_token_id = pad_token_id
        self.on_call = on_call
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: deque[Job] = deque()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self._stopping = False

    @property
    def depth(self) -> int:
        """Jobs waiting for the engine."""
        return self._queue.qsize() + len(self._held)

    def start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name="edgeprism-engine", daemon=True)
                self._thread.start()

    async def submit(self, job: Job) -> JobResult:
        """Queue `job` and wait for its rows. Raises what the engine raised (ValueError: the request)."""
        if job.rows > self.max_batch:
            raise ValueError(f"{job.rows} rows exceed the batch limit of {self.max_batch}")
        if self._closed:
            raise BatcherClosed("the server is shutting down")
        self.start()
        job._loop = asyncio.get_running_loop()
        job._future = job._loop.create_future()
        self._queue.put(job)
        return await job._future

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop after the engine call in progress; jobs still queued fail with BatcherClosed."""
        self._closed = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)

    # --- the engine thread ---
    def _loop(self) -> None:
        while not self._stopping:
            first = self._held.popleft() if self._held else self._queue.get()
            if first is None:
                break
            group = self._collect(first)
            self._run(group)
        leftover = list(self._held)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                leftover.append(job)
        for job in leftover:
            _settle(job, None, BatcherClosed("the server shut down before this request ran"))

    def _collect(self, first: Job) -> list[Job]:
        group, rows = [first], first.rows
        if not self.enabled or first.key is None:
            return group
        for job in list(self._held):
            if job.key == first.key and rows + job.rows <= self.max_batch:
                self._held.remove(job)
                group.append(job)
                rows += job.rows
        deadline = first.arrived_s + self.window_s
        while rows < self.max_batch:
            wait_s = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=wait_s) if wait_s > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._stopping = True
                break
            if job.key == first.key and rows + job.rows <= self.max_batch:
                group.append(job)
                rows += job.rows
            else:
                self._held.append(job)
        return group

    def _run(self, group: list[Job]) -> None:
        live = [job for job in group if not (job._future is not None and job._future.cancelled())]
        if not live:
            return
        try:
            results = self._call(live)
        except ValueError as err:
            if len(live) > 1:  # one bad request must not fail the others: serve each alone
                log.info("merged call of %d requests refused (%s); serving each alone", len(live), err)
                for job in live:
                    self._run_alone(job)
                return
            _settle(live[0], None, err)
            return
        except Exception as err:  # an engine failure: every merged request gets it (as a 500)
            log.exception("engine call for requests %s failed", [job.request_id for job in live])
            for job in live:
                _settle(job, None, err)
            return
        for job, result in zip(live, results):
            _settle(job, result, None)

    def _run_alone(self, job: Job) -> None:
        try:
            (result,) = self._call([job])
        except Exception as err:
            if not isinstance(err, ValueError):
                log.exception("engine call for request %s failed", job.request_id)
            _settle(job, None, err)
            return
        _settle(job, result, None)

    def _call(self, group: list[Job]) -> list[JobResult]:
        rows = [job.rows for job in group]
        merged = group[0].inputs if len(group) == 1 else _merge([job.inputs for job in group], group[0].merge,
                                                                 self.pad_token_id)
        request_id = group[0].request_id if len(group) == 1 else f"{group[0].request_id}+{len(group) - 1}"
        start = time.monotonic()
        try:
            result = group[0].run(merged, request_id)
        except Exception as err:
            self._report(CallReport(sum(rows), len(group), None, err))
            raise
        self._report(CallReport(sum(rows), len(group), result.metrics, None))
        results, offset = [], 0
        for job in group:
            outputs = _rows_of(result.outputs, offset, job.rows, sum(rows), job.inputs)
            results.append(JobResult(outputs, job.inputs, result.metrics, sum(rows), len(group),
                                     max(0.0, start - job.arrived_s)))
            offset += job.rows
        return results

    def _report(self, report: CallReport) -> None:
        if self.on_call is not None:
            try:
                self.on_call(report)
            except Exception:  # metrics must never fail a request; say so loudly once per call
                log.exception("recording the metrics of an engine call failed")


def _merge(parts: list[Inputs], merge: str, pad_token_id: int) -> Inputs:
    if merge == "stack":
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    num_tokens = max(part["input_ids"].shape[1] for part in parts)
    merged: Inputs = {}
    for key in parts[0]:
        value = pad_token_id if key == "input_ids" else _PAD_VALUES.get(key, 0)
        padded = [torch.nn.functional.pad(part[key], (0, num_tokens - part[key].shape[1]), value=value)
                  for part in parts]  # each (rows_i, num_tokens)
        merged[key] = torch.cat(padded)  # (sum rows, num_tokens)
    return merged


def _rows_of(outputs: dict[str, Tensor], offset: int, rows: int, total_rows: int,
             inputs: Inputs) -> dict[str, Tensor]:
    """A job's rows of a merged call's outputs; per-token outputs cut back to the job's own length."""
    own: dict[str, Tensor] = {}
    num_tokens = inputs["input_ids"].shape[1] if "input_ids" in inputs else None
    for key, value in outputs.items():
        if value.dim() == 0 or value.shape[0] != total_rows:
            own[key] = value
            continue
        part = value[offset:offset + rows]
        if key == "hidden" and num_tokens is not None and part.dim() == 3:
            part = part[:, :num_tokens]  # (rows, T_own, d)
        own[key] = part
    return own


def _settle(job: Job, result: Any, error: BaseException | None) -> None:
    def settle() -> None:
        future = job._future
        if future is None or future.done():
            return  # the client went away
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    if job._loop is not None and not job._loop.is_closed():
        job._loop.call_soon_threadsafe(settle)


__all__ = ["Batcher", "BatcherClosed", "CallReport", "Job", "JobResult"]
