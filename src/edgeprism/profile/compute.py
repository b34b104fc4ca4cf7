"""Compute profiling: one Transformer block timed in-process on one pinned core (one emulated device).

Every block of a model has the same size, so one block stands for all of them: a rank's layer with
`n` own tokens and `kv` key/value vectors is `model.blocks[0](hidden (B, n, d), context (B, kv - n, d),
bias)` — exactly what `PositionWise.forward_shard` runs per layer. The request's fixed part
(embedding, final norm, head) is timed separately over the whole request.

The grid is sparse on purpose (the fit has four coefficients): a few batch sizes spread over the
range asked for × four (n, kv) shapes per token count — the whole request on one device, an equal
share attending to every token (CR 1), an equal share attending to the fewest vectors any profiled
codec leaves (the highest CR), and a small uneven share. Points not sampled are what validation
measures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from edgeprism.comm.context import pin_cpu
from edgeprism.compress.registry import num_vectors
from edgeprism.models.base import KVExchangeBlock, ReferenceModel, call_block
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.profile.schema import ComputeSample, ComputeTable

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, str], None]
"""progress(done, total, label): called after each measured point."""

LONG_CALL_S = 0.3
"""`time_call`: calls at least this long get one fewer repeat (their noise is relatively smaller)."""


@dataclass(frozen=True)
class Shape:
    """One point of the grid: `batch` rows, `num_own_tokens` queries, `num_kv_vectors` keys/values."""

    batch: int
    num_own_tokens: int
    num_kv_vectors: int
    kind: str
    """"local", "equal-cr1", "equal-max-cr", "uneven" — why the point is in the grid."""


@dataclass(frozen=True)
class OverheadFit:
    """Per-request time outside the blocks (embed + final norm + head): fixed_s + per_token_s · B · N."""

    fixed_s: float
    per_token_s: float
    samples: tuple[tuple[int, int, float], ...]
    """(batch, num_tokens, seconds) as measured."""


def sparse_batches(batches: Sequence[int], max_points: int = 4) -> tuple[int, ...]:
    """At most `max_points` of `batches`, spread geometrically: always the smallest and the largest."""
    values = sorted(set(int(b) for b in batches))
    if not values or values[0] < 1:
        raise ValueError(f"batch sizes must be >= 1, got {list(batches)}")
    if len(values) <= max_points:
        return tuple(values)
    lo, hi = math.log(values[0]), math.log(values[-1])
    picked: list[int] = []
    for i in range(max_points):
        target = lo + (hi - lo) * i / (max_points - 1)
        best = min((v for v in values if v not in picked), key=lambda v: abs(math.log(v) - target))
        picked.append(best)
    return tuple(sorted(picked))


def fewest_remote_vectors(codecs: Sequence, num_tokens: int, world_size: int) -> int:
    """Fewest vectors an equal-share rank receives from the others under any of `codecs`."""
    other = num_tokens - math.ceil(num_tokens / world_size)
    per_rank = max(1, other // max(1, world_size - 1))
    return min(num_vectors(c, per_rank) for c in codecs) * (world_size - 1)


def compute_grid(token_counts: Sequence[int], batches: Sequence[int], world_size: int,
                 codecs: Sequence) -> list[Shape]:
    """The shapes to time: for each token count N and each sampled batch B, up to four (n, kv) pairs; and the
    equal share seeing everything at the micro-batch slices of the largest batch (B/2, B/4 rounded up, where
    not sampled): a micro-batched plan runs those, and without rows of several batch sizes at one (n, kv) the
    fitted fixed cost per call — what each extra micro-batch pays (plan/pipeline.py) — is not identified (a
    grid of batch 8 alone fitted 89 ms per layer call at half a core; an extra call cost about 9 ms)."""
    shapes: list[Shape] = []
    for num_tokens in token_counts:
        pairs = [(num_tokens, num_tokens, "local")]
        if world_size > 1 and num_tokens >= world_size:
            n_equal = math.ceil(num_tokens / world_size)
            pairs.append((n_equal, num_tokens, "equal-cr1"))
            fewest = fewest_remote_vectors(codecs, num_tokens, world_size) if codecs else num_tokens - n_equal
            pairs.append((n_equal, min(num_tokens, n_equal + fewest), "equal-max-cr"))
            n_small = max(1, num_tokens // (2 * world_size))
            pairs.append((n_small, num_tokens, "uneven"))
        seen = set()
        for batch in batches:
            for n, kv, kind in pairs:
                if (batch, n, kv) not in seen:
                    seen.add((batch, n, kv))
                    shapes.append(Shape(batch, n, kv, kind))
        largest = max(batches, default=1)
        for batch in sorted({-(-largest // 2), -(-largest // 4)} - set(batches), reverse=True):
            if batch < largest:  # the largest batch's micro-batch slices
                for n, kv, kind in pairs[1:2]:  # the equal share at CR 1
                    shapes.append(Shape(batch, n, kv, kind))
    return shapes


@contextlib.contextmanager
def pinned(core: int | None) -> Iterator[None]:
    """Run the body on one core with one intra-op thread (one emulated device); restore afterwards, so
    worker processes launched later still see every core."""
    has_affinity = hasattr(os, "sched_getaffinity")
    saved_cores = os.sched_getaffinity(0) if has_affinity else None
    saved_threads = torch.get_num_threads()
    try:
        if core is None or not has_affinity:
            torch.set_num_threads(1)
        else:
            pin_cpu((core,), threads=1)
        yield
    finally:
        if saved_cores is not None:
            os.sched_setaffinity(0, saved_cores)
        torch.set_num_threads(saved_threads)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 3) -> float:
    """Median seconds of `fn()` over `repeats` timed calls after `warmup` untimed ones (device synced)."""
    first_s = None
    for _ in range(warmup):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        first_s = time.perf_counter() - start
    if first_s is not None and first_s >= LONG_CALL_S and repeats > 2:
        repeats -= 1
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def block_call(model: ReferenceModel, shape: Shape, device: torch.device, seed: int = 0) -> Callable[[], None]:
    """One block for one rank's share, as `forward_shard` runs it through the `Block` protocol (bias shaped
    likewise), ready to time."""
    d, width = model.config.hidden_size, model.config.exchange_width
    block = model.block_list()[0]
    generator = torch.Generator().manual_seed(seed)
    batch, n, kv = shape.batch, shape.num_own_tokens, shape.num_kv_vectors
    hidden = torch.randn(batch, n, d, generator=generator).to(device)  # (B, n, d)
    context = torch.randn(batch, kv - n, width, generator=generator).to(device) if kv > n else None  # (B, S, w)
    positions = torch.arange(n, device=device)
    if shape.kind == "local" and not model.causal:
        bias = torch.zeros(batch, 1, 1, kv, device=device)  # as the reference forward: (B, 1, 1, T)
    else:
        bias = torch.zeros(batch, 1, n, kv, device=device)  # as forward_shard: (B, 1, n_own, n_own + S)

    def run() -> None:
        with torch.no_grad():
            if context is None:
                block(hidden, bias=bias)
                return
            # as `block_with_remote` with the default "normed" exchange: own K/V input, received vectors as sent
            # (a rotary block's received vectors are keys and values already: nothing to project)
            if isinstance(block, KVExchangeBlock):
                kv = block.kv_from_wire(torch.cat([block.wire_kv(hidden, positions), context], dim=1))
            else:
                kv = block.attn.project_kv(torch.cat([block.kv_input(hidden), context], dim=1))  # (B, heads, kv, hd)
            call_block(block, hidden, bias, kv, positions)

    return run


def time_block(model: ReferenceModel, shape: Shape, device: torch.device, warmup: int = 1,
               repeats: int = 3, seed: int = 0) -> float:
    """Median seconds of one block for one rank's share."""
    return time_call(block_call(model, shape, device, seed), device, warmup, repeats)


def time_interleaved(calls: Sequence[Callable[[], None]], device: torch.device, warmup: int = 1, repeats: int = 3,
                     progress: Callable[[int, float], None] | None = None,
                     before: Callable[[], None] | None = None,
                     samples_out: list[list[float]] | None = None) -> list[float]:
    """Median seconds of each call, timed round-robin: a warm-up pass over all, then `repeats` passes.

    On a host whose cores other work shares, slow spells then hit every point alike instead of a few
    points all of their repeats, which keeps the fit consistent. `before` runs (untimed) before every
    call: a barrier, so that all ranks time the same point at the same time. `samples_out`, if given,
    receives every timed sample (one list per call, in pass order)."""
    for _ in range(warmup):
        for call in calls:
            if before:
                before()
            call()
    samples: list[list[float]] = [[] for _ in calls]
    for r in range(repeats):
        for i, call in enumerate(calls):
            if before:
                before()
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            samples[i].append(time.perf_counter() - start)
            if progress:
                progress(r * len(calls) + i + 1, samples[i][-1])
    if samples_out is not None:
        samples_out.extend(samples)
    return [statistics.median(s) for s in samples]


OUTLIER_FACTOR = 4.0
"""`fit_relative` refits without points whose relative residual exceeds this many times the median one."""


def fit_relative(samples: Sequence[ComputeSample], request_overhead_s: float = 0.0) -> ComputeTable:
    """`ComputeTable.fit`, but minimising relative rather than absolute error: points span two orders of
    magnitude (batch 1 to 32), and the planner cares about each request's error in proportion.

    Then once more without the outliers — points off the first fit by more than `OUTLIER_FACTOR` x the
    median relative residual, at most a tenth of the grid: on a shared host a point timed during a slow
    spell (e.g. 0.48 s where a larger kv took 0.40 s) would otherwise pull every prediction. The
    profile keeps every sample, the dropped ones included."""
    table = ComputeTable.fit(samples, request_overhead_s, relative=True)
    if len(samples) < 8:
        return table
    residuals = [abs(table.layer_seconds(s.batch, s.num_own_tokens, s.num_kv_vectors) / s.seconds_per_layer - 1)
                 for s in samples]
    bound = max(OUTLIER_FACTOR * statistics.median(residuals), 0.05)  # a few % is the model's own error
    worst_first = sorted(range(len(samples)), key=residuals.__getitem__, reverse=True)
    dropped = {i for i in worst_first[:len(samples) // 10] if residuals[i] > bound}
    if not dropped:
        return table
    log.info("compute fit: refitting without %d outlier point(s) (relative residual > %.3g)", len(dropped), bound)
    kept = [s for i, s in enumerate(samples) if i not in dropped]
    refit = ComputeTable.fit(kept, request_overhead_s, relative=True)
    return dataclasses.replace(refit, samples=tuple(samples))


def overhead_call(model: ReferenceModel, batch: int, num_tokens: int, device: torch.device) -> Callable[[], None]:
    """Everything a request runs besides its blocks: embed, final norm, head — ready to time."""
    config = model.config
    seq_len = None if config.modality == "image" else num_tokens
    inputs = {k: v.to(device) for k, v in synthetic_inputs(config, batch, seq_len=seq_len, seed=1).items()}
    total = model.validate_input(inputs)

    def run() -> None:
        with torch.no_grad():
            hidden = model.finish(model.embed(inputs, 0, total))
            model.head(hidden[:, -1] if model.causal else hidden[:, 0])

    return run


def fit_overhead(samples: Sequence[tuple[int, int, float]]) -> OverheadFit:
    """Least squares (relative error) of seconds = fixed_s + per_token_s · B · N over (B, N, seconds), both >= 0."""
    import numpy as np

    x = np.array([b * n for b, n, _ in samples], dtype=float)
    y = np.array([s for _, _, s in samples], dtype=float)
    if len(samples) >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1, w=1.0 / np.maximum(y, 1e-12))
        if intercept < 0:
            slope, intercept = float((x @ y) / (x @ x)), 0.0
        if slope < 0:
            slope, intercept = 0.0, float(y.mean())
    else:
        slope, intercept = 0.0, float(y.mean())
    return OverheadFit(float(intercept), float(slope), tuple(samples))


def measure_compute(model: ReferenceModel, token_counts: Sequence[int], batches: Sequence[int], world_size: int,
                    codecs: Sequence, device: torch.device, core: int | None = 0, warmup: int = 1,
                    repeats: int = 3, progress: ProgressFn | None = None,
                    ) -> tuple[ComputeTable, OverheadFit, list[Shape]]:
    """Time the grid in this process, pinned to `core`, and fit the profile's compute table (`fit_compute`).

    One emulated device alone; `compute_job` times the same grid on every device of a session at
    once, as distributed requests run."""
    shapes = compute_grid(token_counts, batches, world_size, codecs)
    overhead_points = [(b, n) for n in token_counts for b in batches]
    total = (len(shapes) + len(overhead_points)) * repeats
    model = model.to(device).eval()

    def report(offset: int, labels: Sequence[str]) -> Callable[[int, float], None]:
        def step(done: int, seconds: float) -> None:
            if progress:
                progress(offset + done, total, f"{labels[(done - 1) % len(labels)]} {seconds * 1e3:.1f} ms")
        return step

    with pinned(core if device.type == "cpu" else None):
        calls = [block_call(model, shape, device) for shape in shapes]
        labels = [f"block B={s.batch} n={s.num_own_tokens} kv={s.num_kv_vectors}" for s in shapes]
        block_s = time_interleaved(calls, device, warmup, repeats, report(0, labels))
        del calls
        calls = [overhead_call(model, batch, num_tokens, device) for batch, num_tokens in overhead_points]
        labels = [f"embed+head B={b} N={n}" for b, n in overhead_points]
        head_s = time_interleaved(calls, device, warmup, repeats, report(len(shapes) * repeats, labels))
    table, overhead = fit_compute(shapes, block_s, overhead_points, head_s, model.config.num_layers)
    return table, overhead, shapes


def fit_compute(shapes: Sequence[Shape], block_s: Sequence[float], overhead_points: Sequence[tuple[int, int]],
                overhead_s: Sequence[float], num_layers: int) -> tuple[ComputeTable, OverheadFit]:
    """The profile's compute table from block timings (rank 0's) and request-overhead timings.

    The per-token part of the request overhead (embedding and final norm run for own tokens only, on
    every rank) is spread over the layers into `per_token_s`, so the table's layer term carries it for
    local and distributed plans alike; the rest is `request_overhead_s`."""
    samples = [ComputeSample(s.batch, s.num_own_tokens, s.num_kv_vectors, t) for s, t in zip(shapes, block_s)]
    overhead = fit_overhead([(b, n, t) for (b, n), t in zip(overhead_points, overhead_s)])
    table = fit_relative(samples, request_overhead_s=overhead.fixed_s)
    table = dataclasses.replace(table, per_token_s=table.per_token_s + overhead.per_token_s / num_layers)
    log.info("compute fit: fixed %.3g s, per token %.3g s, per kv %.3g s, per token·kv %.3g s; overhead %.3g s "
             "+ %.3g s/token", table.fixed_s, table.per_token_s, table.per_kv_s, table.per_token_kv_s,
             overhead.fixed_s, overhead.per_token_s)
    return table, overhead


def fit_errors(table: ComputeTable, per_token_overhead_s: float, num_layers: int) -> tuple[float, float]:
    """(median, max) relative error of the fitted layer time against its own samples."""
    if not table.samples:
        return 0.0, 0.0
    shift = per_token_overhead_s / num_layers
    errors = []
    for s in table.samples:
        fitted = table.layer_seconds(s.batch, s.num_own_tokens, s.num_kv_vectors) - shift * s.batch * s.num_own_tokens
        errors.append(abs(fitted - s.seconds_per_layer) / s.seconds_per_layer if s.seconds_per_layer > 0 else 0.0)
    return statistics.median(errors), max(errors)


__all__ = [
    "OverheadFit",
    "Shape",
    "block_call",
    "compute_grid",
    "fewest_remote_vectors",
    "fit_compute",
    "fit_errors",
    "fit_overhead",
    "fit_relative",
    "measure_compute",
    "overhead_call",
    "pinned",
    "sparse_batches",
    "time_block",
    "time_call",
    "time_interleaved",
]
