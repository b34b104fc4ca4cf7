"""Micro-batches: a batch's rows run as m slices in turn, layer by layer, so one slice's exchange travels while
the others compute (issue 16 item 2; costed by plan/pipeline.py).

Each slice is a generator over the layers (`PositionWise._overlapped_layers`) that yields once per layer, right
after it has started that layer's all-gather and computed the attention over its own keys; resumed, it waits
for the exchange, folds the received vectors in and goes on to the next layer. `interleave` resumes the
slices round-robin, so every rank issues the collectives in the same order (slice 0's layer l, slice 1's layer
l, ..., slice 0's layer l + 1). Rows are independent, so the result equals the whole batch's exactly (up to
float rounding of the smaller GEMMs); one slice is the plain overlapped path.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

from torch import Tensor

from edgeprism.partition.timeline import Timeline

LayerSteps = Generator[None, None, Tensor]
"""A slice's layers: yields after starting each layer's exchange, returns its last hidden states (b, n_own, d)."""


def row_slices(batch: int, micro_batches: int) -> list[slice]:
    """The rows of each micro-batch: min(micro_batches, batch) contiguous slices, sizes differing by at most 1 (also a
    rank's own tokens in token chunks: partition/overlapped.py)."""
    m = max(1, min(micro_batches, batch))
    bounds = [batch * i // m for i in range(m + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(m)]


def interleave(slices: Sequence[LayerSteps], num_layers: int, clock: Timeline, stats) -> list[Tensor]:
    """Run the slices round-robin to the end -> each slice's result, in order. The timeline gets one row per
    layer: round l starts every slice's layer-l exchange and finishes its layer l - 1; the last round (finishing
    layer L - 1) counts in layer L - 1's row, so the rows add up to the wall time."""
    results: list[Tensor | None] = [None] * len(slices)
    for round_ in range(num_layers + 1):
        if round_ < num_layers:
            clock.start_layer(stats)
        for i, steps in enumerate(slices):
            try:
                next(steps)
            except StopIteration as done:
                results[i] = done.value
        if round_ == num_layers:
            clock.end_layer(num_layers - 1, stats)
        elif round_ < num_layers - 1:
            clock.end_layer(round_, stats)
    assert all(r is not None for r in results), "every slice ran its last layer"
    return [r for r in results if r is not None]


__all__ = ["LayerSteps", "interleave", "row_slices"]
