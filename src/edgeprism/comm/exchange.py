"""Timed collectives with explicit CPU staging.

GLOO moves CPU tensors only, so on a GPU every exchange is staged: device → reused pinned CPU buffer
→ collective → device. On a CPU host the staging step is a no-op and measures as zero. Every call
records what it moved and where the time went.

Collectives are issued on the group's backend object directly (its ranks are group-relative), which
works alike for the default group, `dist.new_group` groups and the engine's own `ProcessGroupGloo`
epoch groups. With `deadline` set (a `time.monotonic()` value), every wait is bounded by it: a peer that
died, hangs or sits behind a cut link raises `PeerError` by then instead of after the group's timeout.

With a `sealer` set (an `edgeprism.comm.sealing.LaneSealer`, the engine's lanes when they are private),
every message is sealed before it is staged for the wire and opened right after it arrives: what crosses
the link is ciphertext, and a message that does not open is a `PeerError` (`TamperError`) like a dead
peer. The sum-reduce then becomes sealed sends to rank 0 summed there in rank order (a transport cannot
add ciphertexts). Sealing time counts as staging time and is also kept apart in `sealing_s`.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from edgeprism.comm.background import BackgroundThread, PendingExchange
from edgeprism.comm.context import DistContext

log = logging.getLogger(__name__)
MAX_CONTROL_BYTES = 1 << 20  # control messages (headers) are JSON and bounded


class PeerError(RuntimeError):
    """A collective failed because a peer died, hung, left or sent garbage; the group is no longer usable."""


@dataclass
class ExchangeStats:
    """Accumulated over a request; seconds are wall-clock, bytes are what this rank put on the wire."""

    exchanges: int = 0
    nbytes_sent: int = 0
    nbytes_received: int = 0
    staging_s: float = 0.0
    collective_s: float = 0.0
    emulated_delay_s: float = 0.0
    sealing_s: float = 0.0
    """Of staging_s: sealing and opening messages (0 when the lane is not sealed)."""
    hidden_s: float = 0.0
    """Of emulated_delay_s + collective_s: what background exchanges (`start_all_gather_bytes`) spent on the link
    while the caller computed, not waited for; the caller was blocked on the link for the rest."""
    per_kind_nbytes: dict[str, int] = field(default_factory=dict)
    per_kind_messages: dict[str, int] = field(default_factory=dict)
    """Operations per kind ("control", "scatter", "layer", "output"), sent or received."""

    def add(self, kind: str, sent: int, received: int, staging_s: float, collective_s: float, delay_s: float) -> None:
        self.exchanges += 1
        self.nbytes_sent += sent
        self.nbytes_received += received
        self.staging_s += staging_s
        self.collective_s += collective_s
        self.emulated_delay_s += delay_s
        self.per_kind_nbytes[kind] = self.per_kind_nbytes.get(kind, 0) + sent
        self.per_kind_messages[kind] = self.per_kind_messages.get(kind, 0) + 1

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Gather:
    """One all-gather of byte payloads, staged: `run` crosses the (emulated) link, `finish` opens, copies back
    and records what it cost. Shared by `Exchanger.all_gather_bytes` and its background twin."""

    def __init__(self, exchanger: Exchanger, kind: str, plain: Tensor, sizes: list[int], max_size: int,
                 staged: Tensor, stage_out_s: float, outputs: list[Tensor]) -> None:
        self.exchanger, self.kind, self.plain, self.sizes, self.max_size = exchanger, kind, plain, sizes, max_size
        self.staged, self.stage_out_s, self.outputs = staged, stage_out_s, outputs

    def run(self) -> tuple[float, float]:
        """-> (emulated delay seconds, collective seconds)."""
        ex, world = self.exchanger, self.exchanger.ctx.world_size
        delay_s = ex._delay(self.max_size, world - 1)
        start = time.perf_counter()
        ex._wait(lambda: [ex._pg.allgather([self.outputs], [self.staged])], f"all-gather of {self.kind}")
        return delay_s, time.perf_counter() - start

    def finish_after(self, future: Future) -> list[Tensor]:
        """`finish` of a background run: what the caller waited for it was not hidden behind its compute (it waits
        in the order started, so the runs ahead of this one are done: it waits for at most this run's own time)."""
        start = time.perf_counter()
        delay_s, collective_s = future.result()
        self.exchanger.stats.hidden_s += max(0.0, delay_s + collective_s - (time.perf_counter() - start))
        return self.finish(delay_s, collective_s)

    def finish(self, delay_s: float, collective_s: float) -> list[Tensor]:
        ex = self.exchanger
        rank, world = ex.ctx.group_rank, ex.ctx.world_size
        cut = [self.outputs[i][: self.sizes[i]] for i in range(world)]
        arrived = cut if ex.sealer is None else [self.plain if i == rank else ex._open(cut[i], i, self.kind)
                                                 for i in range(world)]
        received, stage_in_s = ex._to_device(arrived)
        ex.stats.add(self.kind, sent=self.max_size, received=self.max_size * (world - 1),
                     staging_s=self.stage_out_s + stage_in_s + ex._take_seal_s(), collective_s=collective_s,
                     delay_s=delay_s)
        return received


class Exchanger:
    """Staged, timed collectives over the context's group. Reuses its CPU buffers across calls.

    Ranks here are group-relative (`group_dst`/`group_src`), so the same code serves a subgroup.
    """

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.stats = ExchangeStats()
        self.deadline: float | None = None
        """time.monotonic() by which every collective must be done (None: the group's own timeout)."""
        self._buffers: dict[tuple[str, int], Tensor] = {}
        self._pin = ctx.device.type == "cuda"
        self._background: BackgroundThread | None = None
        self._seal_s = 0.0
        self.sealer = None
        """A LaneSealer when this lane's messages are sealed (edgeprism.comm.sealing), else None."""

    # --- the group and bounded waits ---
    @property
    def _pg(self):
        group = self.ctx.group
        return group if group is not None else dist.distributed_c10d._get_default_group()

    def _wait(self, issue, what: str) -> None:
        """Issue the operations (`issue()` returns their works) and wait for them, within the deadline when one
        is set; any failure is a PeerError — also one raised while issuing (a send to a peer whose connection is
        already closed fails there, before there is a work to wait for)."""
        try:
            for work in issue():
                if self.deadline is None:
                    work.wait()
                    continue
                remaining_s = self.deadline - time.monotonic()
                if remaining_s <= 0 and not work.is_completed():
                    raise TimeoutError("the request's deadline had already passed")
                work.wait(timedelta(seconds=max(remaining_s, 1e-3)))
        except (RuntimeError, TimeoutError) as err:
            raise PeerError(f"{what} over {self.ctx.world_size} ranks failed on rank {self.ctx.group_rank}: "
                            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err

    def reset_stats(self) -> ExchangeStats:
        stats, self.stats = self.stats, ExchangeStats()
        return stats

    # --- sealing (a no-op without a sealer) ---
    def _seal(self, payload: Tensor, kind: str) -> Tensor:
        if self.sealer is None:
            return payload
        start = time.perf_counter()
        sealed = self.sealer.seal(payload, kind)
        self._seal_s += time.perf_counter() - start
        return sealed

    def _open(self, blob: Tensor, src: int, kind: str) -> Tensor:
        if self.sealer is None:
            return blob
        start = time.perf_counter()
        plain = self.sealer.open(blob, src, kind)
        self._seal_s += time.perf_counter() - start
        return plain

    def _overhead(self) -> int:
        return self.sealer.overhead if self.sealer is not None else 0

    def _take_seal_s(self) -> float:
        spent, self._seal_s = self._seal_s, 0.0
        self.stats.sealing_s += spent
        return spent

    # --- staging ---
    def _cpu_buffer(self, key: str, index: int, nbytes: int) -> Tensor:
        buffer = self._buffers.get((key, index))
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self._pin)
            self._buffers[(key, index)] = buffer
        return buffer[:nbytes]

    def _to_cpu(self, payload: Tensor, key: str, nbytes: int) -> tuple[Tensor, float]:
        """Copy a flat uint8 payload into a reused CPU buffer of `nbytes` (zero-padded)."""
        start = time.perf_counter()
        staged = self._cpu_buffer(key, -1, nbytes)
        staged[: payload.numel()].copy_(payload, non_blocking=self._pin)
        if payload.numel() < nbytes:
            staged[payload.numel():].zero_()
        _sync(payload.device)
        return staged, time.perf_counter() - start

    def _to_device(self, tensors: list[Tensor]) -> tuple[list[Tensor], float]:
        if self.ctx.device.type == "cpu":
            return [t.clone() for t in tensors], 0.0
        start = time.perf_counter()
        out = [t.to(self.ctx.device, non_blocking=True) for t in tensors]
        _sync(self.ctx.device)
        return out, time.perf_counter() - start

    def _delay(self, nbytes_sent: int, hops: int) -> float:
        return self.ctx.link.before_collective(nbytes_sent, hops) if self.ctx.link is not None else 0.0

    # --- collectives ---
    def all_gather_bytes(self, payload: Tensor, sizes: list[int], kind: str = "layer") -> list[Tensor]:
        """Every rank contributes a flat uint8 payload of sizes[rank] bytes; returns all payloads.

        GLOO's all-gather needs equal shapes, so payloads are padded to max(sizes) and cut back.
        """
        gather = self._stage_gather(payload, sizes, kind)
        delay_s, collective_s = gather.run()
        return gather.finish(delay_s, collective_s)

    def start_all_gather_bytes(self, payload: Tensor, sizes: list[int], kind: str = "layer",
                               slot: int = 0) -> PendingExchange:
        """`all_gather_bytes` in the background: stage now, then the (emulated) link and the collective run on
        the exchanger's thread while the caller computes; `wait()` returns the payloads. One at a time per
        `slot`: wait for it before the next exchange of the same kind and slot (the buffers are reused); exchanges
        in flight at once (micro-batches) take different slots and cross the link in the order started."""
        gather = self._stage_gather(payload, sizes, kind, slot)  # sealed and opened on the caller's thread, in order
        if self._background is None:
            self._background = BackgroundThread()
        future = self._background.submit(gather.run)
        return PendingExchange(lambda: gather.finish_after(future))

    def close(self) -> None:
        """Stop the background thread (if `start_all_gather_bytes` made one); the exchanger is not used after
        this. Called when its lane is retired (edgeprism.runtime.groups.retire_lanes)."""
        if self._background is not None:
            self._background.close()
            self._background = None

    def _stage_gather(self, payload: Tensor, sizes: list[int], kind: str, slot: int = 0) -> _Gather:
        """Seal and stage this rank's payload for an all-gather of `kind` into the buffers of `slot` (the shared
        first half of the sync and the background all-gather)."""
        rank, world = self.ctx.group_rank, self.ctx.world_size
        assert payload.dtype == torch.uint8 and payload.numel() == sizes[rank], (payload.shape, sizes, rank)
        plain, payload = payload, self._seal(payload, kind)
        sizes = [size + self._overhead() for size in sizes]
        max_size = max(sizes)
        key = kind if slot == 0 else f"{kind}#{slot}"
        staged, stage_out_s = self._to_cpu(payload, key, max_size)
        outputs = [self._cpu_buffer(key, i, max_size) for i in range(world)]
        return _Gather(self, kind, plain, sizes, max_size, staged, stage_out_s, outputs)

    def send_forward_bytes(self, payload: Tensor, sizes: list[int], kind: str = "layer") -> list[Tensor | None]:
        """Causal exchange: rank p's payload goes only to ranks q > p; p receives from every q < p.

        Returns a list indexed by source rank (None where nothing was received, i.e. q >= p).
        """
        rank, world = self.ctx.group_rank, self.ctx.world_size
        receivers = list(range(rank + 1, world))
        if receivers:  # sealed once; the same bytes go to every receiver
            payload = self._seal(payload, kind)
        sizes = [size + self._overhead() for size in sizes]
        staged, stage_out_s = self._to_cpu(payload, kind, sizes[rank] if receivers else payload.numel())
        inbox = {q: self._cpu_buffer(kind, q, sizes[q]) for q in range(rank)}
        delay_s = self._delay(sizes[rank] * len(receivers), 1) if receivers or inbox else 0.0
        start = time.perf_counter()
        pg = self._pg
        self._wait(lambda: [pg.send([staged], q, 0) for q in receivers]
                   + [pg.recv([inbox[q]], q, 0) for q in range(rank)], f"forward send of {kind}")
        collective_s = time.perf_counter() - start
        moved, stage_in_s = self._to_device([self._open(inbox[q], q, kind) for q in range(rank)])
        self.stats.add(kind, sent=sizes[rank] * len(receivers), received=sum(sizes[:rank]),
                       staging_s=stage_out_s + stage_in_s + self._take_seal_s(), collective_s=collective_s,
                       delay_s=delay_s)
        return [*moved, *([None] * (world - rank))]

    def send_tensor(self, tensor: Tensor, dst: int, kind: str) -> None:
        flat = self._seal(tensor.detach().contiguous().view(-1).view(torch.uint8), kind)
        staged, stage_s = self._to_cpu(flat, f"{kind}-send", flat.numel())
        delay_s = self._delay(flat.numel(), 1)
        start = time.perf_counter()
        self._wait(lambda: [self._pg.send([staged], dst, 0)], f"send of {kind} to rank {dst}")
        self.stats.add(kind, sent=flat.numel(), received=0, staging_s=stage_s + self._take_seal_s(),
                       collective_s=time.perf_counter() - start, delay_s=delay_s)

    def recv_tensor(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, kind: str) -> Tensor:
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size() + self._overhead()
        buffer = self._cpu_buffer(f"{kind}-recv", src, nbytes)
        start = time.perf_counter()
        self._wait(lambda: [self._pg.recv([buffer], src, 0)], f"receive of {kind} from rank {src}")
        collective_s = time.perf_counter() - start
        (moved,), stage_s = self._to_device([self._open(buffer, src, kind)])
        self.stats.add(kind, sent=0, received=nbytes, staging_s=stage_s + self._take_seal_s(),
                       collective_s=collective_s, delay_s=0.0)
        return moved.view(dtype).view(shape)

    def reduce_sum_to_root(self, tensor: Tensor, kind: str = "output") -> Tensor:
        """Exact float sum over ranks, result valid on rank 0. Sealed: every other rank sends its tensor to
        rank 0 (sealed), which adds them in rank order."""
        if self.sealer is not None:
            if not self.ctx.is_root:
                self.send_tensor(tensor, dst=0, kind=kind)
                return tensor
            total = tensor.detach().to("cpu", copy=True).contiguous()
            for src in range(1, self.ctx.world_size):
                total += self.recv_tensor(tuple(tensor.shape), tensor.dtype, src, kind).to("cpu")
            return total.to(tensor.device)
        cpu = tensor.detach().to("cpu", copy=True).contiguous()
        delay_s = self._delay(cpu.numel() * cpu.element_size(), self.ctx.world_size - 1)
        start = time.perf_counter()
        self._wait(lambda: [self._pg.reduce(cpu, 0, dist.ReduceOp.SUM)], f"reduce of {kind}")
        self.stats.add(kind, sent=cpu.numel() * cpu.element_size(), received=0, staging_s=0.0,
                       collective_s=time.perf_counter() - start, delay_s=delay_s)
        return cpu.to(tensor.device)

    def broadcast_json(self, message: dict | None, kind: str = "control") -> dict:
        """Rank 0's JSON-able dict to every rank: length first, then UTF-8 bytes. No pickle."""
        if self.ctx.is_root:
            data = json.dumps(message, separators=(",", ":")).encode()
            if len(data) > MAX_CONTROL_BYTES:
                raise ValueError(f"control message of {len(data)} bytes exceeds the {MAX_CONTROL_BYTES}-byte bound")
            wire = self._seal(torch.frombuffer(bytearray(data), dtype=torch.uint8), kind)
            length = torch.tensor([wire.numel()], dtype=torch.int64)
        else:
            length = torch.zeros(1, dtype=torch.int64)
        delay_s = self._delay(8, 1)
        start = time.perf_counter()
        self._wait(lambda: [self._pg.broadcast(length, 0)], f"broadcast of a {kind} length")
        size = int(length.item())
        if not 0 < size <= MAX_CONTROL_BYTES + self._overhead():
            raise PeerError(f"control message length {size} is out of bounds; the peer is not an edgeprism rank")
        buffer = wire if self.ctx.is_root else torch.empty(size, dtype=torch.uint8)
        self._wait(lambda: [self._pg.broadcast(buffer, 0)], f"broadcast of a {kind} message")
        collective_s = time.perf_counter() - start
        if self.ctx.is_root:
            self.stats.add(kind, sent=size, received=0, staging_s=self._take_seal_s(), collective_s=collective_s,
                           delay_s=delay_s)
            return message
        buffer = self._open(buffer, 0, kind)
        self.stats.add(kind, sent=0, received=size, staging_s=self._take_seal_s(), collective_s=collective_s,
                       delay_s=delay_s)
        try:
            decoded = json.loads(bytes(buffer.numpy()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise PeerError(f"control message of {size} bytes from rank 0 is not JSON: {err}") from None
        if decoded is not None and not isinstance(decoded, dict):
            raise PeerError(f"control message from rank 0 is a {type(decoded).__name__}, not an object")
        return decoded
