"""Cost-model validation: the profile's predictions against fresh end-to-end runs it did not sample.

Held-out points are batch sizes the compute grid did not time, codecs whose key/value counts the
grid did not time (anything between CR 1 and the highest CR), and for text models a token count
between the profiled ones. Each point runs for real — locally on rank 0, or distributed over every
device of the profile's `LinkSession` (the same link the profile measured) — through
`runtime.batch.run_batch`, and is compared with `plan.cost.predict`. All points run in one job:
`validate_rank` is its rank function (`edgeprism.comm.job`), which reports each result as a progress
line as soon as rank 0 has it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgeprism.comm.context import DistContext
from edgeprism.comm.job import Progress
from edgeprism.plan.cost import predict
from edgeprism.plan.types import LinkEstimate, Plan, Request
from edgeprism.profile.compute import ProgressFn
from edgeprism.profile.link import LinkSession
from edgeprism.profile.schema import Profile
from edgeprism.runtime.batch import BatchSpec, run_batch

LARGE_BATCH = 8
"""Validation points from this batch size on run without a warm-up in each pass (see `validate`)."""
PREFERRED_CODECS = ("int8", "sm4a+int8", "sm2", "fp16")
"""Default held-out codecs, in order of preference: a CR-1 quantiser and a mid-CR Segment Means."""


@dataclass(frozen=True)
class ValidationPoint:
    mode: str
    """"local" or "distributed"."""
    batch: int
    num_tokens: int
    codec: str = ""


@dataclass(frozen=True)
class ValidationRow:
    point: ValidationPoint
    measured_s: float
    predicted_s: float
    predicted_compute_s: float
    predicted_network_s: float
    predicted_latency_s: float
    measured_compute_s: float
    measured_collective_s: float
    token_counts: tuple[int, ...]

    @property
    def rel_error(self) -> float:
        return abs(self.predicted_s - self.measured_s) / self.measured_s

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.point), "measured_s": self.measured_s, "predicted_s": self.predicted_s,
                "rel_error": self.rel_error, "predicted_compute_s": self.predicted_compute_s,
                "predicted_network_s": self.predicted_network_s, "predicted_latency_s": self.predicted_latency_s,
                "measured_compute_s": self.measured_compute_s, "measured_collective_s": self.measured_collective_s,
                "token_counts": list(self.token_counts)}


@dataclass(frozen=True)
class ValidationReport:
    rows: tuple[ValidationRow, ...]
    seconds: float
    link: str
    load_average: tuple[float, float] = (0.0, 0.0)
    """1-minute load average of the host before and after: above its core count, other work shared the
    cores the emulated devices run on, and every timing is noisier for it."""

    @property
    def median_rel_error(self) -> float:
        return statistics.median(r.rel_error for r in self.rows)

    @property
    def max_rel_error(self) -> float:
        return max(r.rel_error for r in self.rows)

    def worst(self) -> ValidationRow:
        return max(self.rows, key=lambda r: r.rel_error)

    def to_dict(self) -> dict[str, Any]:
        return {"median_rel_error": self.median_rel_error, "max_rel_error": self.max_rel_error,
                "validation_seconds": self.seconds, "link": self.link,
                "validation_load_average": list(self.load_average), "points": [r.to_dict() for r in self.rows]}


def held_out_codecs(profile: Profile, count: int = 2) -> tuple[str, ...]:
    """Codecs the compute grid did not time directly (neither CR 1 at full precision nor the highest CR)."""
    names = [c.codec for c in profile.codecs]
    top_cr = max((c.cr for c in profile.codecs), default=1)
    chosen = [n for n in PREFERRED_CODECS if n in names and n != "fp32"]
    if len(chosen) < count:
        chosen += [c.codec for c in profile.codecs if c.codec not in chosen and c.codec != "fp32" and c.cr < top_cr]
    return tuple(chosen[:count]) or tuple(names[:1])


def validation_points(profile: Profile, batches: Sequence[int], token_counts: Sequence[int],
                      codecs: Sequence[str]) -> list[ValidationPoint]:
    """Distributed points first (every device busy), then the local ones (rank 0 alone)."""
    for name in codecs:
        profile.codec(name)  # ValueError naming the profiled codecs
    batches = sorted(set(batches))
    points = [ValidationPoint("distributed", b, n, c) for n in token_counts for b in batches for c in codecs]
    points += [ValidationPoint("local", b, n) for n in token_counts for b in batches]
    return points


def held_out_token_counts(profile: Profile, profiled: Sequence[int]) -> tuple[int, ...]:
    """ViT: its one token count. Text: the geometric midpoint of the profiled counts."""
    if profile.model.modality == "image" or len(profiled) < 2:
        return (profiled[0],)
    values = sorted(profiled)
    return (round(math.sqrt(values[0] * values[-1])),)


def plan_for(profile: Profile, point: ValidationPoint, token_counts: Sequence[int]) -> Plan:
    """The plan a run of `point` executed (token counts as the runtime split them)."""
    if point.mode == "local":
        return Plan(mode="local", ranks=(0,), token_shares=(1.0,), token_counts=(point.num_tokens,), codec="", cr=1,
                    wire_dtype="", predicted_latency_s=0.0, predicted_energy_j=0.0,
                    energy_source=profile.energy.source, objective="latency", reason="validation")
    entry = profile.codec(point.codec)
    k = len(token_counts)
    shares = tuple(n / point.num_tokens for n in token_counts)
    return Plan(
        mode="distributed",
        ranks=tuple(range(k)),
        token_shares=shares,
        token_counts=tuple(token_counts),
        codec=entry.codec,
        cr=entry.cr,
        wire_dtype=entry.wire_dtype,
        predicted_latency_s=0.0,
        predicted_energy_j=0.0,
        energy_source=profile.energy.source,
        objective="latency",
        reason="validation",
    )


def spec_for(profile: Profile, point: ValidationPoint, checkpoint: str | None, warmup: int, repeats: int,
             seed: int = 0, device: str = "cpu") -> BatchSpec:
    text = profile.model.modality == "text"
    return BatchSpec(model=profile.model.name, batch=point.batch, world_size=profile.world_size,
                     mode=point.mode, codec=point.codec or "fp32", seq_len=point.num_tokens if text else None,
                     checkpoint=checkpoint, seed=seed, warmup=warmup, repeats=repeats, device=device)


def compare(profile: Profile, point: ValidationPoint, result: dict[str, Any]) -> ValidationRow:
    counts = tuple(e - s for s, e in result["token_ranges"])
    plan = plan_for(profile, point, counts)
    ratio = result.get("scatter_ratio")  # the run's scatter in the levels form, as Engine.request_of tells the planner
    request = Request(profile.model.name, point.batch, point.num_tokens,
                      None if ratio is None else ratio * profile.input_bytes_per_token)
    prediction = predict(profile, request, plan, LinkEstimate(profile.link.bandwidth_bps, profile.link.latency_s))
    return ValidationRow(point, float(result["latency_s"]), prediction.total_s, prediction.compute_s,
                         prediction.network_s, prediction.latency_s, float(result.get("compute_s", 0.0)),
                         float(result.get("collective_s", 0.0)), counts)


def validate(profile: Profile, session: LinkSession, points: Sequence[ValidationPoint],
             checkpoint: str | None = None, warmup: int = 1, passes: int = 2, device: str = "cpu",
             progress: ProgressFn | None = None, poll_s: float = 0.5) -> ValidationReport:
    """Run every point on `session` (one launch for all) and compare with the profile's predictions.

    The points run round-robin, `passes` times, one timed run each (plus a warm-up for small batches;
    big ones run for seconds in an already warm process), and each point's measurement is the median
    over passes: as in the compute grid, a slow spell of the host then hits all points alike."""
    if not points:
        raise ValueError("no validation points")
    if passes < 1:
        raise ValueError(f"validation passes {passes} must be >= 1")
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    specs = [spec_for(profile, p, checkpoint, warmup if p.batch < LARGE_BATCH else 0, 1, device=device)
             for p in points] * passes
    total = len(specs)
    runs: dict[int, list[dict[str, Any]]] = {}
    done = 0

    def on_line(line: str) -> None:
        nonlocal done
        row = json.loads(line)
        index = row["index"] % len(points)
        runs.setdefault(index, []).append(row)
        done += 1
        if progress:
            p = points[index]
            progress(done, total, f"validate B={p.batch} N={p.num_tokens} {p.codec or 'local'} "
                                  f"{row['latency_s'] * 1e3:.0f} ms")

    session.run(validate_rank, {"specs": [s.to_dict() for s in specs]}, on_progress=on_line,
                dist_backend=specs[0].backend, device=specs[0].device, poll_s=poll_s)
    missing = [i for i in range(len(points)) if len(runs.get(i, ())) != passes]
    if missing:
        raise RuntimeError(f"validation returned no result for points {missing}")
    rows = tuple(compare(profile, points[i], median_run(runs[i])) for i in range(len(points)))
    return ValidationReport(rows, time.perf_counter() - started, session.emulation or "unshaped loopback",
                            (load_before, os.getloadavg()[0]))


def validate_rank(ctx: DistContext, args: dict[str, Any], progress: Progress) -> None:
    """Rank function (`edgeprism.comm.job`): run every BatchSpec of `args["specs"]` in this one job;
    rank 0 reports each result as a progress line `{"index": i, **result}`."""
    for index, spec in enumerate(args["specs"]):
        result = run_batch(BatchSpec.from_dict(spec), ctx)
        if result is not None:
            progress(json.dumps({"index": index, **result}))


def median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs of a point: the median of each timing, the rest from the first."""
    merged = dict(runs[0])
    for key in ("latency_s", "compute_s", "collective_s", "staging_s"):
        if key in merged:
            merged[key] = statistics.median(float(r[key]) for r in runs)
    merged["latencies_s"] = [float(r["latency_s"]) for r in runs]
    return merged


__all__ = [
    "LARGE_BATCH",
    "PREFERRED_CODECS",
    "ValidationPoint",
    "ValidationReport",
    "ValidationRow",
    "compare",
    "held_out_codecs",
    "held_out_token_counts",
    "median_run",
    "plan_for",
    "spec_for",
    "validate",
    "validate_rank",
    "validation_points",
]
