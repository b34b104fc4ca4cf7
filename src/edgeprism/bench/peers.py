"""What the peer strategies share: per-rank accounting of one run, the emulated link, input broadcast.

The peers (`pipeline.PipelinePeer`, `tensor_parallel.TensorParallelPeer`) run on the same ranks, cores
and link as edgeprism. Their traffic pays the same emulated link: on the kernel testbed the rate is
enforced by tbf on every byte GLOO sends, and the one-way delay (plus, on the loopback fallback, the
rate) is charged through `ctx.link.before_collective(nbytes_sent, hops)` exactly as
`edgeprism.comm.exchange.Exchanger` charges edgeprism's own exchanges.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from edgeprism.comm.context import DistContext


@dataclass
class PeerClock:
    """One rank's account of one request: seconds computing, seconds on the link (delay sleeps and
    waits in collectives), bytes this rank put on the wire."""

    compute_s: float = 0.0
    link_s: float = 0.0
    delay_s: float = 0.0
    nbytes_sent: int = 0
    events: list[tuple[str, int]] = field(default_factory=list)

    def charge(self, ctx: DistContext, nbytes_sent: int, hops: int, kind: str) -> None:
        """The emulated link's share of a message step (sleeps; no CPU taken from the device)."""
        slept = ctx.link.before_collective(nbytes_sent, hops) if ctx.link is not None else 0.0
        self.delay_s += slept
        self.link_s += slept
        self.nbytes_sent += nbytes_sent
        self.events.append((kind, nbytes_sent))


@dataclass(frozen=True)
class PeerRun:
    """Rank 0's view of one peer request: outputs, wall latency, and every rank's (wall, compute, link, bytes)."""

    outputs: dict[str, Tensor]
    latency_s: float
    per_rank: tuple[tuple[float, float, float, float], ...]

    @property
    def bytes_exchanged(self) -> int:
        return int(sum(r[3] for r in self.per_rank))

    def energy_j(self, compute_w: float, network_w: float) -> float:
        """Modelled like the engine's rows: compute seconds at compute power, the rest of each rank's wall
        time (link, waiting for peers) at network power."""
        return sum(compute_w * compute + network_w * max(0.0, wall - compute) for wall, compute, _, _ in self.per_rank)


def gather_clocks(ctx: DistContext, wall_s: float, clock: PeerClock) -> tuple[tuple[float, float, float, float], ...]:
    """All-gather every rank's (wall_s, compute_s, link_s, nbytes_sent) after the timed region (untimed)."""
    mine = torch.tensor([wall_s, clock.compute_s, clock.link_s, float(clock.nbytes_sent)], dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, mine, group=ctx.group)
    return tuple(tuple(g.tolist()) for g in gathered)  # type: ignore[misc]


def broadcast_inputs(ctx: DistContext, inputs: dict[str, Tensor] | None, layout: list[tuple[str, list[int], str]],
                     clock: PeerClock) -> dict[str, Tensor]:
    """Rank 0's raw request to every rank (tensor parallelism needs it everywhere); the link is charged
    as rank 0 sending every tensor to each other rank, one hop. `layout`: (key, shape, dtype name)."""
    out = {}
    for key, shape, dtype_name in layout:
        if ctx.is_root:
            assert inputs is not None
            tensor = inputs[key].contiguous()
        else:
            tensor = torch.empty(shape, dtype=getattr(torch, dtype_name))
        nbytes = tensor.numel() * tensor.element_size()
        clock.charge(ctx, nbytes * (ctx.world_size - 1) if ctx.is_root else 0, 1, "input")
        start = time.perf_counter()
        dist.broadcast(tensor, group=ctx.group, group_src=0)
        clock.link_s += time.perf_counter() - start
        out[key] = tensor
    return out


def input_layout(inputs: dict[str, Tensor]) -> list[tuple[str, list[int], str]]:
    """What the other ranks need to allocate for `broadcast_inputs` (sent in the control message)."""
    return [(key, list(t.shape), str(t.dtype).removeprefix("torch.")) for key, t in sorted(inputs.items())]


def head_row(model, hidden: Tensor) -> Tensor:
    """The row the answer is computed from: the last position (decoders) or [CLS]."""
    return hidden[:, -1] if model.causal else hidden[:, 0]


__all__ = ["PeerClock", "PeerRun", "broadcast_inputs", "gather_clocks", "head_row", "input_layout"]
