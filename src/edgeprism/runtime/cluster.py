"""Starting an engine's ranks: a local cluster for applications, the demo and the tests, and the
coordinator that devices join over the network. Both are the same path (edgeprism.runtime.coordinator):

    with launch_engine(3, "vit-tiny-test", profile, cores_per_worker=1) as engine:  # local: 2 workers
        engine.infer(batch)

    engine = launch_engine(3, "vit-tiny-test", profile, listen=("192.168.1.10", 29400),
                           local_workers=False, secret_file="cluster.secret")        # devices join

This process is rank 0: it serves the rendezvous store on the given address (127.0.0.1 for a local
cluster), publishes the sealed cluster spec there, and builds the engine. A local cluster's workers are
`edgeprism join 127.0.0.1:PORT --rank R --no-retry` processes (exactly what a device runs, asking for
their own rank), each pinned to its own cores; this process is not pinned (it is the application). If a
worker dies at start, its stderr tail is in the error raised here; after the start the engine outlives
its workers (docs/RELIABILITY.md), and `restart(rank)` starts a fresh process that joins the running
engine. For devices joining over the network rank 0 does not wait: it serves locally until they come,
and a ticker takes them in between requests and publishes the cluster status.

The cluster's secret is a fresh random one in a file only this user can read, handed to local workers
by path (EDGEPRISM_SECRET_FILE), or the caller's `secret_file`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from edgeprism.comm.auth import NONCE_BYTES, SECRET_FILE_ENV, load_secret, new_secret, write_secret_file
from edgeprism.comm.context import DistContext
from edgeprism.comm.launch import WorkerError, core_assignment, kill_process_groups
from edgeprism.models.loading import load_model, resolve_model
from edgeprism.profile.schema import Profile
from edgeprism.runtime.codec_states import publish_codec_states
from edgeprism.runtime.config import EngineConfig
from edgeprism.runtime.coordinator import (
    PREFIX,
    SPEC_KEY,
    Ticker,
    coordinator_spec,
    publish_spec,
    self_description,
    start_store,
)
from edgeprism.runtime.engine import Engine

log = logging.getLogger(__name__)


class LocalCluster:
    """The worker processes of a local engine (ranks 1..N-1)."""

    def __init__(self, world_size: int, address: str, checkpoint: str | None, cores_per_worker: int | None = 1,
                 env: dict[str, str] | None = None, worker_hosts: dict[int, tuple[list[str], str]] | None = None
                 ) -> None:
        if world_size < 1:
            raise ValueError(f"world size {world_size} must be >= 1")
        self.world_size = world_size
        self.address = address
        """The coordinator's store, HOST:PORT."""
        self.checkpoint = checkpoint
        self.worker_hosts = worker_hosts or {}
        """rank → (command prefix, bind address): a worker on another host (testbed: `ip netns exec ns`)."""
        self.env = dict(env or {})
        # Rank 0 (this process) is not pinned; workers take the cores after rank 0's share.
        self.assignment = core_assignment(world_size, cores_per_worker) if cores_per_worker else [()] * world_size
        self.procs: list[tuple[subprocess.Popen, object]] = []
        for rank in range(1, world_size):
            self.procs.append(self._start(rank))

    def _start(self, rank: int) -> tuple[subprocess.Popen, object]:
        cores = self.assignment[rank]
        worker_env = {**os.environ, **self.env, "OMP_NUM_THREADS": str(len(cores) or 1)}
        prefix, bind_addr = self.worker_hosts.get(rank, ([], None))
        err = tempfile.TemporaryFile("w+")
        # The same command a device runs (`edgeprism join`): a process boundary, not an import of cli/.
        argv = [*prefix, sys.executable, "-m", "edgeprism", "join", self.address, "--rank", str(rank),
                "--no-retry", "--quiet"]
        if cores:
            argv += ["--cores", ",".join(map(str, cores))]
        if bind_addr:
            argv += ["--bind", bind_addr]
        if self.checkpoint:
            argv += ["--checkpoint", self.checkpoint]
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
        kill_process_groups([proc for proc, _ in self.procs])
        for _, err in self.procs:
            err.close()
        self.procs = []


def launch_engine(world_size: int, model: str, profile, checkpoint: str | None = None, seed: int = 0,
                  config: EngineConfig | None = None, cores_per_worker: int | None = 1,
                  link_file: str | os.PathLike | None = None, timeout_s: float = 60.0,
                  start_timeout_s: float = 120.0, meter=None, bind_addr: str = "127.0.0.1",
                  secret_file: str | os.PathLike | None = None,
                  worker_hosts: dict[int, tuple[list[str], str]] | None = None, port: int = 0,
                  local_workers: bool = True, model_obj=None, coordinators: tuple[str, ...] = (),
                  service: dict | None = None, store_allow: tuple = ()) -> Engine:
    """Start an engine of `world_size` ranks; this process is rank 0. `profile` is a Profile or a path;
    `link_file` an emulated link file (edgeprism.testbed.emulation) every rank follows; `bind_addr` and
    `port` where the store and rank 0's lanes listen; `secret_file` the cluster secret (default: a fresh
    one); `worker_hosts` rank → (command prefix, bind address) for local workers on other hosts (the
    testbed's network namespaces). `local_workers=False`: start no workers — devices join over the network
    (`edgeprism join`), and rank 0 serves alone until they do. `model_obj`: the model, already loaded.
    `coordinators`, `service`: the succession list and the HTTP settings a successor takes over, published in
    the sealed spec (edgeprism.runtime.succession). `store_allow`: IPv4 networks whose packets alone reach the
    store besides this host's (edgeprism.runtime.store_filter; empty: every address)."""
    config = config or EngineConfig()
    model, checkpoint = resolve_model(model, checkpoint)  # a checkpoint folder: (its model's name, the folder)
    if model_obj is None:
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
    try:
        store, port = start_store(bind_addr, port, timeout_s, store_allow)
    except BaseException:
        tmp.cleanup()
        raise
    address = f"[{bind_addr}]:{port}" if ":" in bind_addr else f"{bind_addr}:{port}"
    prefixed = dist.PrefixStore(PREFIX, store)
    boot_nonce = os.urandom(NONCE_BYTES)
    if not local_workers:
        config = replace(config, wait_for_workers=False)
    publish_spec(prefixed, secret, boot_nonce, coordinator_spec(model, seed, checkpoint is not None, world_size,
                                                                timeout_s, config, profile, coordinators, service))
    try:
        publish_codec_states(prefixed, secret, boot_nonce, profile)  # tc: codecs' state files (not pinned: MBs)
    except ValueError:
        tmp.cleanup()
        raise
    cluster = None
    if local_workers:
        cluster = LocalCluster(world_size, address, os.path.abspath(checkpoint) if checkpoint else None,
                               cores_per_worker, {**env, SECRET_FILE_ENV: os.fspath(secret_file)},
                               worker_hosts=worker_hosts)
    lanes_addr = None if bind_addr in ("0.0.0.0", "::") else bind_addr
    ticker: list[Ticker] = []

    def stop() -> None:  # the engine's on_close: after the workers were told to stop
        for t in ticker:
            t.stop()
        if cluster is not None:
            cluster.stop()
        tmp.cleanup()

    box: dict = {}

    def join() -> None:  # rank 0 admits the workers while the main thread watches them
        try:
            box["engine"] = Engine(model_obj, profile, ctx, config, meter=meter, store=prefixed, secret=secret,
                                   bind_addr=lanes_addr, on_close=stop, boot_nonce=boot_nonce,
                                   self_info={**self_description(str(ctx.device), ()), "role": "coordinator"})
        except BaseException as err:  # re-raised below, in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=join, name="edgeprism-rank0-join", daemon=True)
    thread.start()
    if cluster is None:
        thread.join()
    else:
        try:
            cluster.wait_while(thread, start_timeout_s)
        except WorkerError:
            tmp.cleanup()
            raise
    if "error" in box:
        problem = cluster.failed() if cluster is not None else None
        if cluster is not None:
            cluster.stop(timeout_s=2.0)
        tmp.cleanup()
        if isinstance(box["error"], ValueError):
            raise box["error"]
        raise WorkerError(f"the engine did not start: {box['error']}" + (f"\n{problem}" if problem else ""))
    engine = box["engine"]
    engine.workers = cluster
    engine.address = address
    engine.pin_store_key(SPEC_KEY, prefixed.get(SPEC_KEY))  # restored if someone on the store overwrites it
    if not local_workers:
        ticker.append(Ticker(engine, prefixed, secret, config.join_check_s))
    return engine


launch_local = launch_engine
"""`with launch_local(2, "vit-tiny-test", profile) as engine: engine.infer(batch)`."""

__all__ = ["LocalCluster", "launch_engine", "launch_local"]
