"""Pipeline-parallel peer: the layers split into contiguous stages, one per rank, run with
`torch.distributed.pipelining` (`PipelineStage` + `ScheduleGPipe`, forward only) over GLOO.

Rank 0 embeds and runs the first stage, the last rank runs the last blocks and the final norm and sends
the answer's row ([CLS] or the last position, (B, d)) back to rank 0, which applies the head. A request
of batch B is cut into M micro-batches (the largest divisor of B up to `max_microbatches`), so stages
overlap. Activations cross the same emulated link as edgeprism's exchanges (see `peers`).

Unpadded requests only (the bench's synthetic requests are): a padding mask would have to travel with
the activations, which this peer does not do.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor, nn

from edgeprism.bench.peers import PeerClock, PeerRun, gather_clocks, head_row
from edgeprism.comm.context import DistContext
from edgeprism.models.base import ReferenceModel
from edgeprism.models.common import causal_bias
from edgeprism.models.registry import get_family


def stage_layers(num_layers: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) block ranges, as even as possible (earlier stages take the remainder)."""
    if num_layers < world_size:
        raise ValueError(f"a {num_layers}-layer model cannot be split into {world_size} pipeline stages")
    base, extra = divmod(num_layers, world_size)
    ranges, start = [], 0
    for stage in range(world_size):
        end = start + base + (1 if stage < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def microbatches(batch: int, max_microbatches: int) -> int:
    """The largest divisor of `batch` up to `max_microbatches` (pipelining wants equal micro-batches)."""
    return max(m for m in range(1, min(batch, max_microbatches) + 1) if batch % m == 0)


class _Stage(nn.Module):
    """Blocks [layer_start, layer_end) of `model`; the first stage also embeds, the last also finishes."""

    def __init__(self, model: ReferenceModel, layer_start: int, layer_end: int, first: bool, last: bool,
                 ctx: DistContext) -> None:
        super().__init__()
        self.model = model  # shared with the engine: no copy of the weights
        self.layer_start, self.layer_end, self.first, self.last = layer_start, layer_end, first, last
        self.ctx = ctx
        self.clock = PeerClock()

    def forward(self, *args: Tensor) -> Tensor:
        start = time.perf_counter()
        model = self.model
        if self.first:
            inputs = dict(zip(get_family(model.config.family).stage_keys, args))
            num_tokens = model.validate_input(inputs)
            hidden = model.embed(inputs, 0, num_tokens)  # (B_micro, T, d)
        else:
            hidden = args[0]
        bias = None
        if model.causal:
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            bias = causal_bias(positions, positions, hidden.dtype)  # (1, 1, T, T)
        for block in model.blocks[self.layer_start:self.layer_end]:
            hidden = block(hidden, bias=bias)
        if self.last:
            hidden = model.finish(hidden)
        self.clock.compute_s += time.perf_counter() - start
        if not self.last:  # the activation goes to the next stage right after this returns
            self.clock.charge(self.ctx, hidden.numel() * hidden.element_size(), 1, "activation")
        return hidden


class PipelinePeer:
    """Collective to build and to run: every rank makes one and calls `run` for the same requests."""

    def __init__(self, model: ReferenceModel, ctx: DistContext, max_microbatches: int | None = None) -> None:
        if ctx.world_size < 2:
            raise ValueError("the pipeline peer needs at least 2 ranks")
        self.model = model.eval()
        self.ctx = ctx
        self.max_microbatches = max_microbatches or 2 * ctx.world_size
        self.layers = stage_layers(model.config.num_layers, ctx.world_size)
        start, end = self.layers[ctx.group_rank]
        self.stage_module = _Stage(model, start, end, ctx.group_rank == 0, ctx.group_rank == ctx.world_size - 1, ctx)
        self._schedules: dict[tuple[int, int], object] = {}

    def _schedule(self, batch: int):
        """One stage and schedule per batch size: a stage infers its micro-batch shapes on first use and
        keeps them (a batch of 32 in 4 micro-batches must not reuse the stage of a batch of 8 in 4)."""
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        num_microbatches = microbatches(batch, self.max_microbatches)
        key = (batch, num_microbatches)
        if key not in self._schedules:
            stage = PipelineStage(self.stage_module, self.ctx.group_rank, self.ctx.world_size, self.ctx.device,
                                  group=self.ctx.group)
            self._schedules[key] = ScheduleGPipe(stage, n_microbatches=num_microbatches)
        return self._schedules[key]

    def run(self, inputs: dict[str, Tensor] | None, batch: int) -> PeerRun | None:
        """One request of `batch` rows (`inputs` on rank 0 only). Rank 0 gets the PeerRun, others None."""
        ctx, model = self.ctx, self.model
        last = ctx.world_size - 1
        clock = self.stage_module.clock = PeerClock()
        schedule = self._schedule(batch)
        start = time.perf_counter()
        with torch.no_grad():
            if ctx.is_root:
                assert inputs is not None
                keys = get_family(model.config.family).stage_keys
                if set(inputs) - set(keys):
                    raise ValueError(f"the pipeline peer takes {list(keys)} (unpadded requests), got {sorted(inputs)}")
                schedule.step(*(inputs[k] for k in keys if k in inputs))
                row = torch.empty(batch, model.config.hidden_size, dtype=next(model.parameters()).dtype)
                waited = time.perf_counter()
                dist.recv(row, group=ctx.group, group_src=last)
                clock.link_s += time.perf_counter() - waited
            else:
                hidden = schedule.step()
                if ctx.group_rank == last:
                    row = head_row(model, hidden).contiguous()  # (B, d)
                    clock.charge(ctx, row.numel() * row.element_size(), 1, "output")
                    dist.send(row, group=ctx.group, group_dst=0)
            wall_s = time.perf_counter() - start
            outputs = {"row": row, **model.head(row)} if ctx.is_root else {}
        per_rank = gather_clocks(ctx, wall_s, clock)
        return PeerRun(outputs, wall_s, per_rank) if ctx.is_root else None


__all__ = ["PipelinePeer", "microbatches", "stage_layers"]
