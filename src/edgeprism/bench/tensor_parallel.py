"""Tensor-parallel peer (Megatron-style) with `torch.distributed.tensor.parallel` over GLOO on CPU.

A copy of the reference model is sharded with `parallelize_module`: query/key/value and the MLP's
fc_in are `ColwiseParallel` (each rank holds heads/P heads and intermediate/P columns), the attention
output and fc_out are `RowwiseParallel`, so each layer does one all-reduce after attention and one after
the MLP. Embeddings, norms and the head stay replicated. The request is broadcast from rank 0 first
(every rank needs the whole input); the answer is ready on every rank, rank 0 returns it.

`Attention.attend` reshapes with the full hidden size, so the copy's attention and MLP are replaced by
the two small modules below (same math, local head count): the reference model itself is not touched.
Each all-reduce pays the emulated link as a ring would: 2(P-1) message steps, 2(P-1)/P of the tensor sent.
"""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import Tensor, nn

from edgeprism.bench.peers import PeerClock, PeerRun, broadcast_inputs, gather_clocks, head_row
from edgeprism.comm.context import DistContext
from edgeprism.models.base import ReferenceModel
from edgeprism.models.common import MLP, Attention, Bias, attention


def _wait(tensor: Tensor) -> Tensor:
    """The all-reduce of a RowwiseParallel output may still be in flight (functional collectives are
    async); wait for it here so that its time is counted as link time, not compute."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return tensor.wait() if isinstance(tensor, AsyncCollectiveTensor) else tensor


class _AllReduceAccounting:
    def __init__(self, owner: TensorParallelPeer) -> None:
        self.owner = owner

    def before(self, shape: tuple[int, ...]) -> None:
        peer = self.owner
        world = peer.ctx.world_size
        nbytes = math.prod(shape) * 4  # fp32 activations
        peer.clock.charge(peer.ctx, 2 * (world - 1) * nbytes // world, 2 * (world - 1), "allreduce")

    def after(self, out: Tensor) -> Tensor:
        start = time.perf_counter()
        out = _wait(out)
        self.owner.clock.link_s += time.perf_counter() - start
        return out


class _ShardedAttention(nn.Module):
    """`models.common.Attention` with heads/P local heads (its Linears are parallelized in place)."""

    def __init__(self, attn: nn.Module, world_size: int, accounting: _AllReduceAccounting) -> None:
        super().__init__()
        self.query, self.key, self.value, self.output = attn.query, attn.key, attn.value, attn.output
        self.num_heads = attn.num_heads // world_size
        self.head_dim = attn.head_dim
        self._accounting = accounting

    def project_kv(self, x_kv: Tensor) -> tuple[Tensor, Tensor]:
        batch, num_kv, _ = x_kv.shape
        k = self.key(x_kv).view(batch, num_kv, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.value(x_kv).view(batch, num_kv, self.num_heads, self.head_dim).transpose(1, 2)
        return k, v  # each (B, heads/P, T_kv, head_dim)

    def attend(self, x_q: Tensor, k: Tensor, v: Tensor, bias: Bias) -> Tensor:
        batch, num_q, _ = x_q.shape
        q = self.query(x_q).view(batch, num_q, self.num_heads, self.head_dim).transpose(1, 2)
        out = attention(q, k, v, bias, 1.0 / math.sqrt(self.head_dim))
        self._accounting.before(tuple(x_q.shape))
        return self._accounting.after(self.output(out.transpose(1, 2).reshape(batch, num_q, -1)))  # (B, T_q, d)

    def forward(self, x_q: Tensor, x_kv: Tensor, bias: Bias = None) -> Tensor:
        k, v = self.project_kv(x_kv)
        return self.attend(x_q, k, v, bias)


class _ShardedMLP(nn.Module):
    def __init__(self, mlp: nn.Module, accounting: _AllReduceAccounting) -> None:
        super().__init__()
        self.fc_in, self.fc_out, self.act = mlp.fc_in, mlp.fc_out, mlp.act
        self._accounting = accounting

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.act(self.fc_in(x))  # (B, T, intermediate/P)
        self._accounting.before(tuple(x.shape))
        return self._accounting.after(self.fc_out(hidden))  # (B, T, d), summed over ranks


class TensorParallelPeer:
    """Collective to build (shards a copy of `model`) and to run."""

    def __init__(self, model: ReferenceModel, ctx: DistContext) -> None:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        config, world = model.config, ctx.world_size
        if world < 2:
            raise ValueError("the tensor-parallel peer needs at least 2 ranks")
        if not all(isinstance(b.attn, Attention) and isinstance(b.mlp, MLP) for b in model.blocks):
            raise ValueError(f"{config.name}: the tensor-parallel baseline shards models.common's Attention and MLP; "
                             f"{type(model.blocks[0]).__name__} blocks (e.g. grouped-query attention, SwiGLU) "
                             f"are not covered")
        if config.num_heads % world or config.intermediate_size % world:
            raise ValueError(f"{config.name} has {config.num_heads} heads and {config.intermediate_size} MLP columns; "
                             f"tensor parallelism over {world} ranks needs both divisible by {world}")
        self.ctx = ctx
        self.clock = PeerClock()
        group = ctx.group if ctx.group is not None else torch.distributed.group.WORLD
        mesh = DeviceMesh.from_group(group, ctx.device.type)
        accounting = _AllReduceAccounting(self)
        self.model = copy.deepcopy(model).eval()
        for block in self.model.blocks:
            block.attn = _ShardedAttention(block.attn, world, accounting)
            block.mlp = _ShardedMLP(block.mlp, accounting)
            parallelize_module(block.attn, mesh, {"query": ColwiseParallel(), "key": ColwiseParallel(),
                                                  "value": ColwiseParallel(), "output": RowwiseParallel()})
            parallelize_module(block.mlp, mesh, {"fc_in": ColwiseParallel(), "fc_out": RowwiseParallel()})

    def run(self, inputs: dict[str, Tensor] | None, layout: list[tuple[str, list[int], str]]) -> PeerRun | None:
        """One request (`inputs` on rank 0; `layout` from `peers.input_layout` on every rank)."""
        clock = self.clock = PeerClock()
        start = time.perf_counter()
        with torch.no_grad():
            everywhere = broadcast_inputs(self.ctx, inputs, layout, clock)
            outputs = self.model(everywhere)
            wall_s = time.perf_counter() - start
        clock.compute_s = max(0.0, wall_s - clock.link_s)
        per_rank = gather_clocks(self.ctx, wall_s, clock)
        if not self.ctx.is_root:
            return None
        row = head_row(self.model, outputs["hidden"])
        return PeerRun({"row": row, **{k: v for k, v in outputs.items() if k != "hidden"}}, wall_s, per_rank)


__all__ = ["TensorParallelPeer"]
