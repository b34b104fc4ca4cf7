"""Retiring lanes whose peers died or hang never touches a descriptor the process has reused (the defect
docs/RELIABILITY.md described under "Freeing a group whose peer died"): rank 0 here, two peers in
subprocesses; each round one peer is SIGKILLed and the other stopped (SIGSTOP, a cut link), a collective
fails, `retire_lanes` frees the group on its daemon thread, and meanwhile this process opens pipes and
runs subprocesses (taking the lowest free descriptor numbers: those the group's sockets just released).
Every pipe must still be the same open file after the group is gone, and the descriptors the groups
held must all be closed (none leaked: an exchanger's background thread once kept every retired group
alive, and with it its sockets, threads and buffers)."""

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from edgeprism.comm.context import DistContext
from edgeprism.comm.exchange import Exchanger
from edgeprism.runtime.groups import Lane, gloo_group, retire_lanes

PEER = '''
import sys, time, torch, torch.distributed as dist
from datetime import timedelta
from edgeprism.runtime.groups import gloo_group
port, prefix, rank = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
group = gloo_group(dist.PrefixStore(prefix, store), rank, 3, 120.0, "127.0.0.1")
group.allreduce([torch.ones(4)]).wait()
outputs = [torch.empty(64, dtype=torch.uint8) for _ in range(3)]
group.allgather([outputs], [torch.full((64,), rank, dtype=torch.uint8)]).wait()  # rank 0's background gather
print("connected", flush=True)
time.sleep(600)
'''
GROUP_TIMEOUT_S = 2.0


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _retire_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "edgeprism-retire-groups"]


def test_retiring_groups_with_dead_and_hung_peers_spares_reused_descriptors():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=120), wait_for_workers=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for thread in _retire_threads():  # other tests' groups: not this test's business
        thread.join(60)
    baseline = _fds()
    for round_ in range(2):
        prefix = f"round{round_}/"
        peers = [subprocess.Popen([sys.executable, "-c", PEER, str(store.port), prefix, str(rank)], env=env,
                                  stdout=subprocess.PIPE, text=True) for rank in (1, 2)]
        try:
            group = gloo_group(dist.PrefixStore(prefix, store), 0, 3, 120.0, "127.0.0.1")
            group.allreduce([torch.ones(4)]).wait()
            ctx = DistContext(group_rank=0, world_size=3, backend="gloo", device=torch.device("cpu"),
                              timeout_s=GROUP_TIMEOUT_S, group=group)
            exchanger = Exchanger(ctx)  # its background thread once held the group for good (leaked per epoch)
            gathered = exchanger.start_all_gather_bytes(torch.zeros(64, dtype=torch.uint8), [64] * 3).wait()
            assert [int(t[0]) for t in gathered] == [0, 1, 2]
            assert [p.stdout.readline().strip() for p in peers] == ["connected", "connected"]
            group.set_timeout(timedelta(seconds=GROUP_TIMEOUT_S))
            held_by_group = _fds() - baseline
            peers[0].kill()
            peers[1].send_signal(signal.SIGSTOP)
            work = group.allreduce([torch.ones(1 << 16)])
            try:
                work.wait(timedelta(seconds=0.5))
            except RuntimeError:
                pass  # the dead peer's reset, or the hung one's timeout: either way the lane is broken
            del work
            lanes = {(0, 1, 2): Lane((0, 1, 2), ctx, exchanger)}
            del group, ctx, exchanger, gathered
            retire_lanes(lanes, linger_s=GROUP_TIMEOUT_S + 0.5)
            pipes, owners = [], []
            deadline = time.monotonic() + GROUP_TIMEOUT_S + 1.5
            while time.monotonic() < deadline:  # keep taking fresh numbers while the group is freed
                r, w = os.pipe()
                pipes.append((r, w))
                owners.append((os.fstat(r).st_ino, os.fstat(w).st_ino))
                subprocess.run(["true"], check=True)
                time.sleep(0.05)
            for thread in _retire_threads():
                thread.join(60)
            reused = {fd for pair in pipes for fd in pair} & held_by_group
            assert reused, f"no pipe took a number the group held ({sorted(held_by_group)}): the check is void"
            for (r, w), owner in zip(pipes, owners):
                assert (os.fstat(r).st_ino, os.fstat(w).st_ino) == owner, f"pipe ({r}, {w}) is now another file"
                os.write(w, b"x")
                assert os.read(r, 1) == b"x"
                os.close(r)
                os.close(w)
        finally:
            for peer in peers:
                peer.kill()
                peer.wait()
                peer.stdout.close()
        assert not [t for t in threading.enumerate() if t.name == "edgeprism-exchange"]
        leaked = _fds() - baseline
        deadline = time.monotonic() + 15.0  # the store closes the killed peers' connections on its own thread
        while leaked and time.monotonic() < deadline:
            time.sleep(0.2)
            leaked = _fds() - baseline
        assert not leaked, f"descriptors left open after round {round_}: {sorted(leaked)}"
