"""Starting a job's N ranks: here as local processes, or one per testbed host.

`run_job(world_size, fn, args, testbed=...)` is the one way a job starts: every rank runs the one
process main (`edgeprism.comm.job`) with the rank function `fn`, and rank 0's result comes back (its
progress lines go to `on_progress` as they appear). `JobSession` holds the devices for several jobs:
testbed hosts joined by an emulated link when a link is given, plain local processes otherwise.
(Serving ranks start the other way: `runtime.cluster.launch_engine` and `edgeprism join`.)

Without a testbed, `launch_local` sets the environment torchrun would (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) plus EDGEPRISM_CORES so each process pins itself to its own cores: N
processes emulate N devices. If any fails, the others are killed and the failing rank's error is raised
here. On a testbed, `testbed.launch.run_torchrun` starts one torchrun node per host in its namespace.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeprism.comm.job import ENTRY_MODULE, RankFunction, collective_timeout_s, function_name
from edgeprism.testbed.launch import run_torchrun
from edgeprism.testbed.net import Testbed
from edgeprism.testbed.presets import LinkPreset

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
            kill_process_groups([p for p, _, _ in procs])
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
        kill_process_groups([p for p, _, _ in procs])
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


def kill_process_groups(procs: list[subprocess.Popen], reap_s: float = 5.0) -> None:
    """SIGKILL the process group of every process still running (each started in its own session: its children
    go with it), then reap them, waiting at most `reap_s` for each."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for proc in procs:
        try:
            proc.wait(timeout=reap_s)
        except subprocess.TimeoutExpired:
            pass


def job_argv(fn: RankFunction, args_file: str, out_file: str, progress_file: str, timeout_s: float,
             dist_backend: str = "auto", device: str = "cpu") -> list[str]:
    """`python` arguments that run `fn` on one rank through the one process main."""
    return ["-m", ENTRY_MODULE, function_name(fn), "--args", "@" + args_file, "--out", out_file,
            "--progress", progress_file, "--timeout-s", f"{collective_timeout_s(timeout_s):g}",
            "--backend", dist_backend, "--device", device]


def _follow(path: str, on_line: Callable[[str], None] | None, seen: int) -> int:
    """Hand `on_line` the complete lines of `path` after the first `seen`; returns how many there are."""
    if on_line is None or not os.path.exists(path):
        return seen
    with open(path) as handle:
        lines = handle.read().split("\n")[:-1]  # the last piece is incomplete (or empty)
    for line in lines[seen:]:
        on_line(line)
    return len(lines)


def run_job(world_size: int, fn: RankFunction, args: Mapping[str, Any] | None = None, *,
            testbed: Testbed | None = None, cores_per_worker: int | None = 1, timeout_s: float = 600.0,
            env: Mapping[str, str] | None = None, dist_backend: str = "auto", device: str = "cpu",
            on_progress: Callable[[str], None] | None = None, poll_s: float = 0.5) -> Any:
    """Run `fn(ctx, args, progress)` on `world_size` ranks and return rank 0's result.

    `testbed`: one rank per host of this (up) testbed, through torchrun in its namespaces; else local
    processes pinned to `cores_per_worker` cores each. `args` must be JSON. `on_progress(line)` gets
    each line rank 0 reports, in this thread, while the job runs. Raises WorkerError (local) or
    testbed.launch.LaunchError with the failing rank's error; every rank is stopped after `timeout_s`.
    """
    if testbed is not None and testbed.num_hosts != world_size:
        raise ValueError(f"a job of {world_size} ranks on a testbed of {testbed.num_hosts} hosts: "
                         "one rank per host")
    with tempfile.TemporaryDirectory(prefix="edgeprism-job-") as tmp:
        os.chmod(tmp, 0o755)  # ranks in other namespaces run as the same user, but be explicit
        args_file, out_file, progress_file = (os.path.join(tmp, name)
                                              for name in ("args.json", "result.json", "progress"))
        with open(args_file, "w") as handle:
            json.dump(dict(args or {}), handle)
        argv = job_argv(fn, args_file, out_file, progress_file, timeout_s, dist_backend, device)
        failure: list[BaseException] = []

        def launch() -> None:
            try:
                if testbed is not None:
                    run_torchrun(testbed, argv, env=env, timeout_s=timeout_s)
                else:
                    launch_local(world_size, argv, cores_per_worker=cores_per_worker, timeout_s=timeout_s,
                                 env=dict(env or {}))
            except BaseException as err:  # re-raised below, in the caller's thread
                failure.append(err)

        if on_progress is None:
            launch()
        else:
            runner = threading.Thread(target=launch, name="edgeprism-job", daemon=True)
            runner.start()
            seen = 0
            while runner.is_alive():
                seen = _follow(progress_file, on_progress, seen)
                runner.join(poll_s)
            _follow(progress_file, on_progress, seen)
        if failure:
            raise failure[0]
        with open(out_file) as handle:
            return json.load(handle)


class JobSession:
    """`world_size` devices for several jobs: a context manager that brings a testbed up and down.

    With a `link`: one testbed host per rank joined by that emulated link (`edgeprism.testbed`: netns +
    tbf as root, else loopback with the link emulated in the transport, or as `backend` says). Without:
    plain local processes on loopback. `run` starts a job on them (`run_job`). `speeds`: a CPU quota per
    testbed host in cores (`testbed.cpu`; needs a link)."""

    def __init__(self, world_size: int, link: LinkPreset | None = None, backend: str = "auto",
                 cores_per_worker: int = 1, timeout_s: float = 600.0, speeds: Sequence[float] | None = None,
                 medium: str = "switched") -> None:
        if world_size < 1:
            raise ValueError(f"world size {world_size} must be >= 1")
        if backend not in ("auto", "netns", "loopback"):
            raise ValueError(f"link backend {backend!r}: choose auto, netns or loopback")
        if speeds is not None and link is None:
            raise ValueError(f"device speeds {list(speeds)} need a testbed: give a link too")
        self.world_size = world_size
        self.speeds = None if speeds is None else tuple(speeds)
        self.medium = medium
        self.link = link
        self.backend = backend
        self.cores_per_worker = cores_per_worker
        self.timeout_s = timeout_s
        self.testbed: Testbed | None = None

    def __enter__(self) -> JobSession:
        if self.link is not None:
            self.testbed = Testbed(self.world_size, self.link, cores_per_host=self.cores_per_worker,
                                   backend=self.backend, speeds=self.speeds,  # type: ignore[arg-type]
                                   medium=self.medium).up()  # type: ignore[arg-type]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.testbed is not None:
            self.testbed.down()
            self.testbed = None

    @property
    def emulation(self) -> str:
        """How the link is made: "" for a real (here: unshaped loopback) link."""
        if self.testbed is None:
            return ""
        return f"{self.testbed.emulation}: {self.link}"

    def run(self, fn: RankFunction, args: Mapping[str, Any] | None = None, *,
            env: Mapping[str, str] | None = None, on_progress: Callable[[str], None] | None = None,
            dist_backend: str = "auto", device: str = "cpu", poll_s: float = 0.5) -> Any:
        """`run_job` on this session's devices; rank 0's result."""
        return run_job(self.world_size, fn, args, testbed=self.testbed, cores_per_worker=self.cores_per_worker,
                       timeout_s=self.timeout_s, env=env, dist_backend=dist_backend, device=device,
                       on_progress=on_progress, poll_s=poll_s)
