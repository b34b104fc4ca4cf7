"""The API's counters and histograms, written in Prometheus' text exposition format (version 0.0.4).

Written here rather than with prometheus_client (not a dependency): a handful of counters, gauges and
fixed-bucket histograms, one instance per app (no module-level registry), safe to update from the
event loop and the engine thread. Names and meanings: docs/API.md.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Request latency buckets: 1 ms (a tiny local model) to 30 s (a long completion over a slow link)."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Rows / requests per engine call: powers of two up to a large max_batch."""

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    escaped = (v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for _, v in labels)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(labels, escaped)) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class ApiMetrics:
    """Counters and histograms of one app. `render()` is the body of GET /metrics."""

    def __init__(self, gauges: Callable[[], dict[str, tuple[str, float]]] | None = None) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = {}
        self._histograms: dict[str, dict[Labels, _Histogram]] = {}
        self._gauges = gauges
        """Read at render time: name → (help, value), e.g. the engine's cluster members."""

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        with self._lock:
            series = self._counters.setdefault(name, {})
            key = tuple(sorted(labels.items()))
            series[key] = series.get(key, 0.0) + amount

    def observe(self, name: str, value: float, buckets: Sequence[float], **labels: str) -> None:
        with self._lock:
            series = self._histograms.setdefault(name, {})
            key = tuple(sorted(labels.items()))
            series.setdefault(key, _Histogram(buckets)).observe(value)

    def counter_value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def histogram_counts(self, name: str, **labels: str) -> dict[float, int]:
        """Observations per bucket (not cumulative): upper bound → count (tests, the load report)."""
        with self._lock:
            hist = self._histograms.get(name, {}).get(tuple(sorted(labels.items())))
            if hist is None:
                return {}
            counts, below = {}, 0
            for bound, cumulative in zip(hist.buckets, hist.counts):
                counts[bound] = cumulative - below
                below = cumulative
            counts[math.inf] = hist.total - below
            return counts

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name in sorted(self._counters):
                lines += [f"# HELP {name} {HELP.get(name, name)}", f"# TYPE {name} counter"]
                lines += [f"{name}{_labels(k)} {_number(v)}" for k, v in sorted(self._counters[name].items())]
            for name in sorted(self._histograms):
                lines += [f"# HELP {name} {HELP.get(name, name)}", f"# TYPE {name} histogram"]
                for key, hist in sorted(self._histograms[name].items()):
                    for bound, count in zip(hist.buckets, hist.counts):
                        lines.append(f"{name}_bucket{_labels(key + (('le', _number(bound)),))} {count}")
                    lines.append(f"{name}_bucket{_labels(key + (('le', '+Inf'),))} {hist.total}")
                    lines.append(f"{name}_sum{_labels(key)} {_number(hist.sum)}")
                    lines.append(f"{name}_count{_labels(key)} {hist.total}")
        for name, (help_text, value) in sorted((self._gauges() if self._gauges else {}).items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {_number(value)}"]
        return "\n".join(lines) + "\n"


HELP = {
    "edgeprism_http_requests_total": "HTTP requests answered, by endpoint and status code.",
    "edgeprism_http_unauthorized_total": "HTTP requests refused 401 for a missing or wrong API key, by code.",
    "edgeprism_errors_total": "Requests that failed in the engine (HTTP 500), by endpoint.",
    "edgeprism_fallbacks_total": "Engine calls whose distributed plan failed and was rerun on rank 0.",
    "edgeprism_bytes_exchanged_total": "Bytes the plan's ranks put on the wire, summed over engine calls.",
    "edgeprism_engine_calls_total": "Engine calls (infer or generate), by plan mode.",
    "edgeprism_request_latency_seconds": "Time from a request's arrival to its answer, by plan mode.",
    "edgeprism_engine_latency_seconds": "Measured latency of one engine call (the metrics row), by plan mode.",
    "edgeprism_batch_rows": "Rows per engine call (all merged requests).",
    "edgeprism_batch_requests": "Requests merged into one engine call.",
}

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS_S", "ApiMetrics"]
