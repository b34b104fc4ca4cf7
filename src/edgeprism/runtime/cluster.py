"""A local cluster for applications and the demo: this process is rank 0, N - 1 workers are started.

    with Engine.launch_local(3, "vit-tiny-test", profile, cores_per_worker=1) as engine:
        engine.infer(batch)

Workers run `python -m edgeprism.runtime.worker --spec ...` with the environment torchrun would give
them (as `edgeprism.comm.launch` does), each pinned to its own cores; this process is not pinned (it is
the application). If a worker dies, its stderr tail is in the error raised here.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from edgeprism.comm.launch import WorkerError, core_assignment, free_port

log = logging.getLogger(__name__)


class LocalCluster:
    """The worker processes of a local engine (ranks 1..N-1)."""

    def __init__(self, world_size: int, spec: dict, cores_per_worker: int | None = 1,
                 env: dict[str, str] | None = None) -> None:
        if world_size < 1:
            raise ValueError(f"world size {world_size} must be >= 1")
        self.world_size = world_size
        self.port = free_port()
        self.env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self.port), "WORLD_SIZE": str(world_size),
                    "LOCAL_WORLD_SIZE": str(world_size), **(env or {})}
        # Rank 0 (this process) is not pinned; workers take the cores after rank 0's share.
        assignment = core_assignment(world_size, cores_per_worker) if cores_per_worker else [()] * world_size
        self.procs: list[tuple[subprocess.Popen, object]] = []
        for rank in range(1, world_size):
            worker_env = {**os.environ, **self.env, "RANK": str(rank), "LOCAL_RANK": str(rank),
                          "EDGEPRISM_CORES": ",".join(map(str, assignment[rank])),
                          "OMP_NUM_THREADS": str(len(assignment[rank]) or 1)}
            err = tempfile.TemporaryFile("w+")
            proc = subprocess.Popen([sys.executable, "-m", "edgeprism.runtime.worker", "--spec", json.dumps(spec)],
                                    env=worker_env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            self.procs.append((proc, err))

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
                    os.killpg(proc.pid, 9)
                except ProcessLookupError:
                    pass
                proc.wait()
            err.close()
        self.procs = []


def launch_engine(world_size: int, model: str, profile, checkpoint: str | None = None, seed: int = 0,
                  config=None, cores_per_worker: int | None = 1, link_file: str | os.PathLike | None = None,
                  timeout_s: float = 60.0, start_timeout_s: float = 120.0, meter=None):
    """Start a local engine of `world_size` ranks; this process is rank 0. `profile` is a Profile or a
    path; `link_file` an emulated link file (edgeprism.testbed.emulation) every rank follows."""
    from edgeprism.comm.context import init_distributed
    from edgeprism.models.loading import load_model
    from edgeprism.profile.schema import Profile
    from edgeprism.runtime.engine import Engine, EngineConfig

    config = config or EngineConfig()
    model_obj = load_model(model, checkpoint, seed=seed)  # user mistakes surface here, before any worker starts
    if not isinstance(profile, Profile):
        profile = Profile.load(profile, expect_model=model_obj.config, expect_world_size=world_size)
    profile.check(model_obj.config, world_size)
    env = {"EDGEPRISM_LINK_FILE": os.fspath(link_file)} if link_file else {}
    if world_size == 1:
        ctx = init_distributed("gloo", environ={"RANK": "0", "WORLD_SIZE": "1", **env})
        return Engine(model_obj, profile, ctx, config, meter=meter, owns_ctx=True)
    tmp = tempfile.TemporaryDirectory(prefix="edgeprism-engine-")
    profile_path = Path(tmp.name) / "profile.json"
    profile.save(profile_path)
    spec = {"model": model, "checkpoint": os.path.abspath(checkpoint) if checkpoint else None, "seed": seed,
            "profile": str(profile_path), "config": config.__dict__, "timeout_s": timeout_s}
    cluster = LocalCluster(world_size, spec, cores_per_worker, env)
    box: dict = {}

    def join() -> None:  # rank 0 joins while the main thread watches the workers
        try:
            # init_distributed's env:// rendezvous reads os.environ, which an application's rank 0 should
            # not have to change: join by TCP address here, then let it build the context (it sees the
            # group is up and only reads the rest of the environment we give it).
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cluster.port}", rank=0,
                                    world_size=world_size, timeout=timedelta(seconds=timeout_s))
            ctx = init_distributed("gloo", environ=cluster.rank0_environ(), timeout_s=timeout_s)
            box["engine"] = Engine(model_obj, profile, ctx, config, meter=meter, owns_ctx=True)
        except BaseException as err:  # re-raised below, in the caller's thread
            box["error"] = err
            if dist.is_initialized():
                dist.destroy_process_group()

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
    engine._tmpdir = tmp  # the profile file lives as long as the engine
    return engine


__all__ = ["LocalCluster", "launch_engine"]
