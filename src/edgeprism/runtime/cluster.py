"""A local cluster for applications and the demo: this process is rank 0, N - 1 workers are started.

    with Engine.launch_local(3, "vit-tiny-test", profile, cores_per_worker=1) as engine:
        engine.infer(batch)

Workers run `python -m edgeprism.runtime.worker --spec ...` with the environment torchrun would give
them (as `edgeprism.comm.launch` does), each pinned to its own cores; this process is not pinned (it is
the application). If a worker dies at start, its stderr tail is in the error raised here; after the
start the engine outlives its workers (docs/RELIABILITY.md), and `restart(rank)` starts a fresh process
that joins the running engine.

Rank 0 hosts the rendezvous store on a socket bound to 127.0.0.1 (`bind_addr`), the data lanes listen on
the same address, and the cluster's secret is a fresh random one in a file only this user can read,
handed to the workers by path (EDGEPRISM_SECRET_FILE), or the caller's `secret_file`.
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
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from edgeprism.comm.auth import SECRET_FILE_ENV, load_secret, new_secret, write_secret_file
from edgeprism.comm.launch import WorkerError, core_assignment

log = logging.getLogger(__name__)


class LocalCluster:
    """The worker processes of a local engine (ranks 1..N-1)."""

    def __init__(self, world_size: int, spec: dict, cores_per_worker: int | None = 1,
                 env: dict[str, str] | None = None, port: int = 0, bind_addr: str = "127.0.0.1",
                 worker_hosts: dict[int, tuple[list[str], str]] | None = None) -> None:
        if world_size < 1:
            raise ValueError(f"world size {world_size} must be >= 1")
        self.world_size = world_size
        self.spec = spec
        self.port = port
        self.worker_hosts = worker_hosts or {}
        """rank → (command prefix, bind address): a worker on another host (testbed: `ip netns exec ns`)."""
        self.env = {"MASTER_ADDR": bind_addr, "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
                    "LOCAL_WORLD_SIZE": str(world_size), **(env or {})}
        # Rank 0 (this process) is not pinned; workers take the cores after rank 0's share.
        self.assignment = core_assignment(world_size, cores_per_worker) if cores_per_worker else [()] * world_size
        self.procs: list[tuple[subprocess.Popen, object]] = []
        for rank in range(1, world_size):
            self.procs.append(self._start(rank))

    def _start(self, rank: int) -> tuple[subprocess.Popen, object]:
        cores = self.assignment[rank]
        worker_env = {**os.environ, **self.env, "RANK": str(rank), "LOCAL_RANK": str(rank),
                      "EDGEPRISM_CORES": ",".join(map(str, cores)), "OMP_NUM_THREADS": str(len(cores) or 1)}
        prefix, bind_addr = self.worker_hosts.get(rank, ([], self.spec.get("bind_addr")))
        spec = {**self.spec, "bind_addr": bind_addr}
        err = tempfile.TemporaryFile("w+")
        argv = [*prefix, sys.executable, "-m", "edgeprism.runtime.worker", "--spec", json.dumps(spec)]
        proc = subprocess.Popen(argv, env=worker_env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        return proc, err

    def pid(self, rank: int) -> int:
        return self.procs[rank - 1][0].pid

    def signal(self, rank: int, signum: int = signal.SIGKILL) -> None:
        """Send a worker a signal (tests: SIGKILL a rank, SIGSTOP / SIGCONT to make it hang)."""
        os.kill(self.pid(rank), signum)

    def restart(self, rank: int) -> int:
        """Start a fresh process for `rank` (killing the old one if it is still there); it joins the running
        engine, which takes it in between two requests. Returns the new pid."""
        proc, err = self.procs[rank - 1]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        err.close()
        self.procs[rank - 1] = self._start(rank)
        return self.pid(rank)

    def stderr_tail(self, rank: int, lines: int = 20) -> str:
        _, err = self.procs[rank - 1]
        err.seek(0)
        return "\n".join(err.read().strip().splitlines()[-lines:])

    def rank0_environ(self) -> dict[str, str]:
        return {**self.env, "RANK": "0", "LOCAL_RANK": "0"}

    def failed(self) -> str | None:
        """A description of the first worker that exited non-zero (with its stderr tail), else None."""
        for rank, (proc, err) in enumerate(self.procs, start=1):
            code = proc.poll()
            if code not in (None, 0):
                err.seek(0)
                tail = "\n".join(err.read().strip().splitlines()[-20:])
                return f"worker rank {rank} exited with {code}:\n{tail}"
        return None

    def wait_while(self, thread: threading.Thread, timeout_s: float) -> None:
        """Wait for `thread` (rank 0 joining) while watching the workers; raise WorkerError if one dies."""
        deadline = time.monotonic() + timeout_s
        while thread.is_alive():
            problem = self.failed()
            if problem:
                self.stop()
                raise WorkerError(f"the local engine did not start: {problem}")
            if time.monotonic() > deadline:
                self.stop()
                raise WorkerError(f"the local engine did not start within {timeout_s:.0f} s")
            thread.join(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait for the workers to exit (after a shutdown message), then kill any left."""
        deadline = time.monotonic() + timeout_s
        for proc, _ in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc, err in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
            err.close()
        self.procs = []


def listening_socket(bind_addr: str) -> socket.socket:
    """A TCP socket listening on `bind_addr` on a free port (the store's; never all interfaces by default)."""
    family = socket.AF_INET6 if ":" in bind_addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bind_addr, 0))
    sock.listen(128)
    return sock


def launch_engine(world_size: int, model: str, profile, checkpoint: str | None = None, seed: int = 0,
                  config=None, cores_per_worker: int | None = 1, link_file: str | os.PathLike | None = None,
                  timeout_s: float = 60.0, start_timeout_s: float = 120.0, meter=None,
                  bind_addr: str = "127.0.0.1", secret_file: str | os.PathLike | None = None,
                  worker_hosts: dict[int, tuple[list[str], str]] | None = None):
    """Start a local engine of `world_size` ranks; this process is rank 0. `profile` is a Profile or a
    path; `link_file` an emulated link file (edgeprism.testbed.emulation) every rank follows;
    `bind_addr` the address the store and the lanes listen on; `secret_file` the cluster secret
    (default: a fresh one); `worker_hosts` rank → (command prefix, bind address) for workers on other
    hosts (the testbed's network namespaces)."""
    from edgeprism.comm.context import DistContext
    from edgeprism.models.loading import load_model
    from edgeprism.profile.schema import Profile
    from edgeprism.runtime.engine import Engine, EngineConfig

    config = config or EngineConfig()
    model_obj = load_model(model, checkpoint, seed=seed)  # user mistakes surface here, before any worker starts
    if not isinstance(profile, Profile):
        profile = Profile.load(profile, expect_model=model_obj.config, expect_world_size=world_size)
    profile.check(model_obj.config, world_size)
    env = {"EDGEPRISM_LINK_FILE": os.fspath(link_file)} if link_file else {}
    link = None
    if link_file:
        from edgeprism.testbed.emulation import EmulatedLink  # optional seam: only when a link file is given

        link = EmulatedLink.from_env(env)
    ctx = DistContext(group_rank=0, world_size=world_size, backend="gloo", device=torch.device("cpu"),
                      timeout_s=timeout_s, link=link)
    if world_size == 1:
        return Engine(model_obj, profile, ctx, config, meter=meter)
    tmp = tempfile.TemporaryDirectory(prefix="edgeprism-engine-")
    if secret_file is None:
        secret_file = write_secret_file(Path(tmp.name) / "secret", new_secret())
    secret = load_secret({SECRET_FILE_ENV: os.fspath(secret_file)})
    profile_path = Path(tmp.name) / "profile.json"
    profile.save(profile_path)
    listener = listening_socket(bind_addr)
    port = listener.getsockname()[1]
    store = dist.TCPStore(bind_addr, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                          master_listen_fd=listener.fileno())
    spec = {"model": model, "checkpoint": os.path.abspath(checkpoint) if checkpoint else None, "seed": seed,
            "profile": str(profile_path), "config": config.__dict__, "timeout_s": timeout_s,
            "store": f"{bind_addr}:{port}", "bind_addr": bind_addr}
    cluster = LocalCluster(world_size, spec, cores_per_worker, {**env, SECRET_FILE_ENV: os.fspath(secret_file)},
                           port=port, bind_addr=bind_addr, worker_hosts=worker_hosts)
    box: dict = {}

    def join() -> None:  # rank 0 admits the workers while the main thread watches them
        try:
            box["engine"] = Engine(model_obj, profile, ctx, config, meter=meter,
                                   store=dist.PrefixStore("edgeprism/", store), secret=secret, bind_addr=bind_addr)
        except BaseException as err:  # re-raised below, in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=join, name="edgeprism-rank0-join", daemon=True)
    thread.start()
    try:
        cluster.wait_while(thread, start_timeout_s)
    except WorkerError:
        tmp.cleanup()
        raise
    if "error" in box:
        problem = cluster.failed()
        cluster.stop(timeout_s=2.0)
        tmp.cleanup()
        if isinstance(box["error"], ValueError):
            raise box["error"]
        raise WorkerError(f"the local engine did not start: {box['error']}" + (f"\n{problem}" if problem else ""))
    engine = box["engine"]
    engine._cluster = cluster
    engine._tmpdir = tmp  # the profile and secret files live as long as the engine
    engine._store_server = (store, listener)
    return engine


__all__ = ["LocalCluster", "launch_engine", "listening_socket"]
