"""Process-group set-up: one `init_distributed` reads the launcher's environment; the rest takes `ctx`."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

Backend = Literal["auto", "gloo", "nccl"]


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the group, and how it talks to the others."""

    group_rank: int
    world_size: int
    backend: str
    device: torch.device
    timeout_s: float
    group: Any = None
    """The torch ProcessGroup (None = the default group)."""
    link: Any = field(default=None, compare=False)
    """An `edgeprism.testbed.emulation.EmulatedLink` when the link's delay is emulated, else None."""
    cores: tuple[int, ...] = ()

    @property
    def is_root(self) -> bool:
        return self.group_rank == 0

    def __str__(self) -> str:
        return (f"rank {self.group_rank}/{self.world_size} backend={self.backend} device={self.device} "
                f"cores={list(self.cores) or 'all'}")


def parse_cores(text: str) -> tuple[int, ...]:
    """'0-1,3' → (0, 1, 3)."""
    cores: list[int] = []
    for piece in text.split(","):
        piece = piece.strip()
        if not piece:
            continue
        if "-" in piece:
            lo, hi = piece.split("-", 1)
            cores.extend(range(int(lo), int(hi) + 1))
        else:
            cores.append(int(piece))
    return tuple(cores)


def pin_cpu(cores: tuple[int, ...], threads: int | None = None) -> None:
    """Pin this process to `cores` and use that many intra-op threads (one emulated device)."""
    if cores and hasattr(os, "sched_setaffinity"):
        available = os.sched_getaffinity(0)
        wanted = set(cores) & available if available else set(cores)
        if not wanted:
            raise ValueError(f"cores {list(cores)} are not available to this process (it may use {sorted(available)})")
        os.sched_setaffinity(0, wanted)
    count = threads or (len(cores) if cores else None)
    if count:
        torch.set_num_threads(count)


def init_distributed(backend: Backend = "auto", device: str | torch.device = "cpu", timeout_s: float = 60.0,
                     environ: Mapping[str, str] | None = None) -> DistContext:
    """Join the process group described by torchrun's (or the local launcher's) environment.

    Reads RANK, WORLD_SIZE, MASTER_ADDR/MASTER_PORT (torchrun sets them, with rendezvous for
    multi-node runs), EDGEPRISM_CORES (cores to pin to, e.g. "0" or "2-3"), EDGEPRISM_THREADS and
    EDGEPRISM_LINK_FILE (emulated link delay). A world of one needs no process group.
    """
    env = os.environ if environ is None else environ
    rank = int(env.get("RANK", "0"))
    world_size = int(env.get("WORLD_SIZE", "1"))
    cores = parse_cores(env.get("EDGEPRISM_CORES", ""))
    threads = int(env["EDGEPRISM_THREADS"]) if env.get("EDGEPRISM_THREADS") else None
    if cores or threads:
        pin_cpu(cores, threads)
    device = torch.device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if backend == "nccl" and not dist.is_nccl_available():
        raise ValueError("backend nccl was asked for but this torch build has no NCCL; use --backend gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    link = None
    if env.get("EDGEPRISM_LINK_FILE"):
        from edgeprism.testbed.emulation import EmulatedLink  # optional seam: only when a testbed set it

        link = EmulatedLink.from_env(env)
    if world_size > 1 and not dist.is_initialized():
        # Rendezvous from the given environment (not necessarily os.environ): torchrun's MASTER_ADDR/PORT.
        # Under torchrun (os.environ) keep env://, which knows to join the elastic agent's store.
        addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
        init_method = f"tcp://{addr}:{port}" if environ is not None and addr and port else "env://"
        dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    ctx = DistContext(group_rank=rank, world_size=world_size, backend=backend, device=device,
                      timeout_s=timeout_s, link=link, cores=cores)
    log.info("joined: %s", ctx)
    return ctx


def shutdown(ctx: DistContext) -> None:
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
