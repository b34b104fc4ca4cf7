"""A local launcher: N worker processes on this machine, over the same code path as torchrun.

It sets the environment torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
plus EDGEPRISM_CORES so each worker pins itself to its own cores: N workers emulate N devices.
If any worker fails, the others are killed and the failing rank's error is raised here.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """A worker exited non-zero (or the job timed out); carries the failing rank's stderr tail."""


@dataclass(frozen=True)
class WorkerResult:
    group_rank: int
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def core_assignment(world_size: int, cores_per_worker: int) -> list[tuple[int, ...]]:
    """Rank r gets cores [r*k, (r+1)*k) of the cores this process may use, wrapping (with a warning)."""
    available = (
        sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    )
    needed = world_size * cores_per_worker
    if needed > len(available):
        log.warning("%d workers x %d cores need %d cores but %d are available: emulated devices will share cores",
                    world_size, cores_per_worker, needed, len(available))
    return [tuple(available[(r * cores_per_worker + i) % len(available)] for i in range(cores_per_worker))
            for r in range(world_size)]


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def launch_local(world_size: int, argv: list[str], cores_per_worker: int | None = 1, timeout_s: float = 600.0,
                 env: dict[str, str] | None = None) -> list[WorkerResult]:
    """Run `python <argv...>` as `world_size` ranks; returns per-rank results or raises WorkerError."""
    if world_size < 1:
        raise ValueError(f"world size {world_size} must be >= 1")
    port = free_port()
    assignment = core_assignment(world_size, cores_per_worker) if cores_per_worker else [()] * world_size
    procs: list[tuple[subprocess.Popen, object, object]] = []
    base_env = {**os.environ, **(env or {})}
    try:
        for rank in range(world_size):
            worker_env = {**base_env, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                          "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                          "EDGEPRISM_CORES": ",".join(map(str, assignment[rank])),
                          "OMP_NUM_THREADS": str(len(assignment[rank]) or 1)}
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            proc = subprocess.Popen([sys.executable, *argv], env=worker_env, stdout=out, stderr=err,
                                    start_new_session=True)
            procs.append((proc, out, err))
        deadline = time.monotonic() + timeout_s
        failed: int | None = None
        while True:
            codes = [p.poll() for p, _, _ in procs]
            bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if failed is not None or any(p.poll() is None for p, _, _ in procs):
            time.sleep(0.3)  # let the others notice and print their side
            _kill_all(procs)
        results = []
        for rank, (proc, out, err) in enumerate(procs):
            out.seek(0)
            err.seek(0)
            results.append(WorkerResult(rank, proc.wait(), out.read(), err.read()))
        if failed is not None:
            failed = _root_cause(results, failed)
            raise WorkerError(f"rank {failed} failed (exit {results[failed].returncode}); the other ranks were "
                              f"stopped. Its last output:\n{_tail(results[failed].stderr)}")
        if any(r.returncode != 0 for r in results):
            raise WorkerError(f"the job did not finish within {timeout_s:.0f} s; all ranks were stopped. "
                              f"Rank 0's last output:\n{_tail(results[0].stderr)}")
        return results
    finally:
        _kill_all(procs)
        for _, out, err in procs:
            out.close()
            err.close()


_PEER_LOSS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Socket closed")


def _root_cause(results: list[WorkerResult], first_seen: int) -> int:
    """The rank whose failure was not merely noticing another rank's death."""
    failed = [r for r in results if r.returncode not in (0, -9)]
    for result in failed:
        if not any(marker in result.stderr for marker in _PEER_LOSS):
            return result.group_rank
    return first_seen


def _kill_all(procs) -> None:
    for proc, _, _ in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for proc, _, _ in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
