"""The transport fake: P ranks as P threads of one process, exchanging through shared memory.

Same `Exchanger` interface and the same `PositionWise` code as a real process group; only the wire is
replaced. Fidelity does not depend on the wire, so evaluations (thousands of forwards) run here
without process start-up or socket costs; tests use it to check the transform quickly. Byte counts
are recorded exactly as the real exchanger records them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from edgeprism.comm.background import PendingExchange
from edgeprism.comm.context import DistContext
from edgeprism.comm.exchange import MAX_CONTROL_BYTES, ExchangeStats

T = TypeVar("T")


class _Shared:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size)
        self.slots: list[object] = [None] * world_size
        self.mailbox: dict[tuple[int, int, str], list[Tensor]] = {}
        self.lock = threading.Condition()


class LoopbackExchanger:
    """Exchanger for one thread-rank of a `LoopbackGroup`."""

    def __init__(self, ctx: DistContext, shared: _Shared) -> None:
        self.ctx = ctx
        self.shared = shared
        self.stats = ExchangeStats()

    def reset_stats(self) -> ExchangeStats:
        stats, self.stats = self.stats, ExchangeStats()
        return stats

    def _all_gather_objects(self, item: object) -> list[object]:
        shared = self.shared
        shared.slots[self.ctx.group_rank] = item
        shared.barrier.wait()
        gathered = list(shared.slots)
        shared.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return gathered

    def all_gather_bytes(self, payload: Tensor, sizes: list[int], kind: str = "layer") -> list[Tensor]:
        assert payload.numel() == sizes[self.ctx.group_rank]
        gathered = self._all_gather_objects(payload.clone())
        world = self.ctx.world_size
        self.stats.add(kind, sent=max(sizes), received=max(sizes) * (world - 1), staging_s=0.0, collective_s=0.0,
                       delay_s=0.0)
        return gathered  # type: ignore[return-value]

    def start_all_gather_bytes(self, payload: Tensor, sizes: list[int], kind: str = "layer",
                               slot: int = 0) -> PendingExchange:
        """The same exchange, done at once (threads of one process: nothing to overlap; no buffers, so no slots)."""
        gathered = self.all_gather_bytes(payload, sizes, kind)
        return PendingExchange(lambda: gathered)

    def send_forward_bytes(self, payload: Tensor, sizes: list[int], kind: str = "layer") -> list[Tensor | None]:
        rank, world = self.ctx.group_rank, self.ctx.world_size
        gathered = self._all_gather_objects(payload.clone())
        self.stats.add(kind, sent=sizes[rank] * (world - 1 - rank), received=sum(sizes[:rank]), staging_s=0.0,
                       collective_s=0.0, delay_s=0.0)
        return [gathered[q] if q < rank else None for q in range(world)]  # type: ignore[misc]

    def send_tensor(self, tensor: Tensor, dst: int, kind: str) -> None:
        shared = self.shared
        with shared.lock:
            shared.mailbox.setdefault((self.ctx.group_rank, dst, kind), []).append(tensor.detach().clone())
            shared.lock.notify_all()
        self.stats.add(kind, sent=tensor.numel() * tensor.element_size(), received=0, staging_s=0.0,
                       collective_s=0.0, delay_s=0.0)

    def recv_tensor(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, kind: str) -> Tensor:
        shared = self.shared
        key = (src, self.ctx.group_rank, kind)
        with shared.lock:
            if not shared.lock.wait_for(lambda: shared.mailbox.get(key), timeout=self.ctx.timeout_s):
                raise TimeoutError(f"rank {self.ctx.group_rank} got nothing from rank {src} in {self.ctx.timeout_s} s")
            tensor = shared.mailbox[key].pop(0)
        assert tuple(tensor.shape) == tuple(shape) and tensor.dtype == dtype, (tensor.shape, shape, tensor.dtype, dtype)
        self.stats.add(kind, sent=0, received=tensor.numel() * tensor.element_size(), staging_s=0.0,
                       collective_s=0.0, delay_s=0.0)
        return tensor

    def reduce_sum_to_root(self, tensor: Tensor, kind: str = "output") -> Tensor:
        gathered = self._all_gather_objects(tensor.detach().clone())
        self.stats.add(kind, sent=tensor.numel() * tensor.element_size(), received=0, staging_s=0.0,
                       collective_s=0.0, delay_s=0.0)
        total = gathered[0].clone()  # same summation order as GLOO's reduce is not guaranteed; fine in fp32
        for other in gathered[1:]:
            total += other
        return total

    def broadcast_json(self, message: dict | None, kind: str = "control") -> dict:
        if self.ctx.is_root:
            data = json.dumps(message, separators=(",", ":"))
            if len(data) > MAX_CONTROL_BYTES:
                raise ValueError(f"control message of {len(data)} bytes exceeds the {MAX_CONTROL_BYTES}-byte bound")
        gathered = self._all_gather_objects(message if self.ctx.is_root else None)
        size = len(json.dumps(gathered[0], separators=(",", ":")).encode())
        self.stats.add(kind, sent=size if self.ctx.is_root else 0, received=0 if self.ctx.is_root else size,
                       staging_s=0.0, collective_s=0.0, delay_s=0.0)
        return json.loads(json.dumps(gathered[0]))


class LoopbackGroup:
    """Run a function on P thread-ranks; each gets its own DistContext and LoopbackExchanger."""

    def __init__(self, world_size: int, timeout_s: float = 120.0) -> None:
        if world_size < 1:
            raise ValueError(f"world size {world_size} must be >= 1")
        self.world_size = world_size
        self.timeout_s = timeout_s

    def run(self, fn: Callable[[DistContext, LoopbackExchanger], T]) -> list[T]:
        shared = _Shared(self.world_size)
        results: list[T | None] = [None] * self.world_size
        errors: list[BaseException | None] = [None] * self.world_size

        def body(rank: int) -> None:
            ctx = DistContext(group_rank=rank, world_size=self.world_size, backend="loopback",
                              device=torch.device("cpu"), timeout_s=self.timeout_s)
            try:
                results[rank] = fn(ctx, LoopbackExchanger(ctx, shared))
            except BaseException as err:  # re-raised in the caller below
                errors[rank] = err
                shared.barrier.abort()  # wake the others instead of leaving them waiting

        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self.timeout_s)
        for _rank, err in enumerate(errors):
            if err is not None and not isinstance(err, threading.BrokenBarrierError):
                raise err
        if any(e is not None for e in errors) or any(t.is_alive() for t in threads):
            raise RuntimeError(f"loopback group of {self.world_size} ranks did not finish in {self.timeout_s} s")
        return results  # type: ignore[return-value]
