"""Launch one torchrun node per testbed host, each in its namespace and pinned to its own cores.

Every host runs `python -m torch.distributed.run --nnodes=N --node-rank=i --rdzv-backend=c10d
--rdzv-endpoint=<host 0>:<port> ...` through `ip netns exec` (netns testbed) and `taskset`, so the
ranks meet through torch's own multi-node rendezvous over the emulated links. Whatever happens
(failure of one node, timeout, Ctrl-C), every process this started is gone when it returns.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import IO

from edgeprism.testbed.emulation import LINK_FILE_ENV
from edgeprism.testbed.net import Host, Testbed, kill_netns_processes

__all__ = ["LaunchError", "run_torchrun", "torchrun_command"]

log = logging.getLogger(__name__)

FAILURE_GRACE_S = 2.0
"""After one node fails, how long the others get to exit on their own before they are killed."""
STDERR_TAIL_CHARS = 3000


class LaunchError(RuntimeError):
    """A testbed launch failed or timed out; `.results` holds every node's CompletedProcess."""

    def __init__(self, message: str, results: list[subprocess.CompletedProcess[str]]) -> None:
        super().__init__(message)
        self.results = results


def torchrun_command(testbed: Testbed, host: Host, argv: list[str], run_id: str) -> list[str]:
    """The command line that starts `host`'s torchrun node."""
    return [
        *testbed.command_prefix(host),  # its CPU group, its namespace, its cores
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={testbed.num_hosts}",
        f"--node-rank={host.index}",  # informational: c10d orders nodes by --local-addr (see net.py)
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={testbed.rdzv_endpoint}",
        f"--rdzv-id={run_id}",
        # torch guesses whether to host the rendezvous store from the hostname, which is wrong inside
        # a namespace; host 0 hosts it.
        f"--rdzv-conf=is_host={int(host.index == 0)}",
        f"--local-addr={host.address}",
        "--max-restarts=0",
        *argv,
    ]


def _host_env(testbed: Testbed, host: Host, env: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(os.environ)
    merged.update(env or {})
    merged.update({
        "GLOO_SOCKET_IFNAME": host.ifname,
        "OMP_NUM_THREADS": str(len(host.cores)),
        LINK_FILE_ENV: testbed.link_file,
        "EDGEPRISM_TESTBED_HOST": str(host.index),
        "EDGEPRISM_TESTBED_EMULATION": testbed.emulation,
    })
    return merged


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _process_tree(root_pid: int) -> list[int]:
    children = _children_by_parent()
    tree, stack = [], [root_pid]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def _kill_all(procs: list[subprocess.Popen[bytes]], testbed: Testbed) -> None:
    """SIGTERM then SIGKILL every process started (torchrun puts its workers in new sessions, so the
    whole tree is collected first), and everything left in the hosts' namespaces."""
    pids = [pid for p in procs if p.poll() is None for pid in _process_tree(p.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.05)
        pids = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
        if not pids:
            break
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("process %d survived SIGKILL", p.pid)
    for host in testbed.hosts:
        if host.netns is not None:
            kill_netns_processes(host.netns)


FAILURE_MARKER = b"ChildFailedError"
"""What torchrun's agent raises when a worker failed; the agent itself may then linger on exit (seen
with the c10d rendezvous), so a node counts as failed as soon as this shows in its stderr."""


def _worker_failed(errs: list[IO[bytes]]) -> bool:
    for err in errs:
        err.flush()
        with open(f"/proc/self/fd/{err.fileno()}", "rb") as fh:
            fh.seek(max(0, os.fstat(err.fileno()).st_size - 8192))
            if FAILURE_MARKER in fh.read():
                return True
    return False


def run_torchrun(
    testbed: Testbed,
    argv: list[str],
    env: Mapping[str, str] | None = None,
    timeout_s: float = 600.0,
    check: bool = True,
) -> list[subprocess.CompletedProcess[str]]:
    """Run `argv` (`comm.launch.run_job` passes ["-m", "edgeprism.comm.job", ...]) as one torchrun node per host.

    Returns each host's CompletedProcess (index = host index; host 0 holds rank 0). With `check`,
    raises LaunchError with rank 0's stderr tail when any node fails or `timeout_s` passes.
    """
    if not testbed.is_up:
        raise RuntimeError("run_torchrun needs a testbed that is up (use `with Testbed(...) as tb:`)")
    run_id = f"ep-{testbed.tag}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    procs: list[subprocess.Popen[bytes]] = []
    outs, errs = [], []
    commands = [torchrun_command(testbed, host, argv, run_id) for host in testbed.hosts]
    timed_out = False
    try:
        for host, cmd in zip(testbed.hosts, commands):
            out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
            outs.append(out)
            errs.append(err)
            log.info("host %d: %s", host.index, " ".join(cmd))
            procs.append(subprocess.Popen(cmd, env=_host_env(testbed, host, env), stdout=out, stderr=err,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + timeout_s
        failed_at: float | None = None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and (any(p.returncode not in (None, 0) for p in procs) or _worker_failed(errs)):
                failed_at = now
            if now > deadline:
                timed_out = True
                break
            if failed_at is not None and now - failed_at > FAILURE_GRACE_S:
                break
            time.sleep(0.05)
    finally:
        # Also on KeyboardInterrupt and on errors above: never leave a rank running.
        _kill_all(procs, testbed)
    results = []
    for cmd, p, out, err in zip(commands, procs, outs, errs):
        out.seek(0)
        err.seek(0)
        results.append(subprocess.CompletedProcess(
            cmd, p.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace")
        ))
        out.close()
        err.close()
    if check and (timed_out or any(r.returncode != 0 for r in results)):
        codes = ", ".join(f"host {i}: {r.returncode}" for i, r in enumerate(results))
        what = f"timed out after {timeout_s:g} s" if timed_out else "failed"
        message = (f"torchrun on {testbed.num_hosts} testbed hosts ({testbed.emulation}) {what} (exit codes {codes}); "
                   f"rank 0 stderr tail:\n{results[0].stderr[-STDERR_TAIL_CHARS:]}")
        # Rank 0 often only shows that it was stopped; add the first host whose worker failed.
        culprit = next((i for i, r in enumerate(results) if FAILURE_MARKER.decode() in r.stderr), None)
        if culprit not in (None, 0):
            message += f"\nhost {culprit} (failed first) stderr tail:\n{results[culprit].stderr[-STDERR_TAIL_CHARS:]}"
        raise LaunchError(message, results)
    return results
