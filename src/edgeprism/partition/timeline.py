"""Where one rank's time goes, layer by layer, in the position-wise split (issue 16: a per-layer timeline).

Per layer: `encode_s` (the codec's encode and packing), `exchange_s` (the link: emulated delay plus the
collective, as the exchanger timed it; it may run beside compute when overlapped), `wait_s` (how long the
layer's compute was blocked on the exchange: the whole collective without overlap, only what compute
could not hide with it) and `compute_s` (the rest of the layer's wall time: model math, decoding, staging).
encode_s + wait_s + compute_s is the layer's wall time on this rank.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple


class LayerTiming(NamedTuple):
    layer: int
    encode_s: float
    exchange_s: float
    wait_s: float
    compute_s: float


def _link_seconds(stats: Any) -> float:
    return float(stats.collective_s + stats.emulated_delay_s)


class Timeline:
    """One request's layers on this rank (`PositionWise.timeline` after `forward`)."""

    def __init__(self) -> None:
        self.layers: list[LayerTiming] = []
        self._start = self._link = self._encode_s = self._wait_s = 0.0

    def start_layer(self, stats: Any) -> None:
        self._start, self._link = time.perf_counter(), _link_seconds(stats)
        self._encode_s = self._wait_s = 0.0

    @contextmanager
    def encoding(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._encode_s += time.perf_counter() - start

    @contextmanager
    def waiting(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._wait_s += time.perf_counter() - start

    def end_layer(self, layer: int, stats: Any) -> None:
        wall_s = time.perf_counter() - self._start
        self.layers.append(LayerTiming(layer, self._encode_s, _link_seconds(stats) - self._link, self._wait_s,
                                       max(0.0, wall_s - self._encode_s - self._wait_s)))

    def to_rows(self) -> list[dict[str, float]]:
        return [t._asdict() for t in self.layers]

    def totals(self) -> dict[str, float]:
        """Sums over the layers (seconds)."""
        return {key: sum(getattr(t, key) for t in self.layers)
                for key in ("encode_s", "exchange_s", "wait_s", "compute_s")}


__all__ = ["LayerTiming", "Timeline"]
