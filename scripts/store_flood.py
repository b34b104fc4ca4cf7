"""What a stranger who floods the coordinator's rendezvous store (torch's TCPStore) does to a serving cluster.

    python scripts/store_flood.py --connections 2000 --clients 8 --big-values 32 --big-mib 8 --json

A sealed 2-rank vit-tiny-test cluster (launch_local, loopback) serves distributed requests while a stranger,
in a process of its own, (1) holds `--connections` idle TCP connections to the store port, (2) runs
`--clients` TCPStore clients that set and get 1 KiB values as fast as they can, (3) writes `--big-values`
values of `--big-mib` MiB. For the baseline and each phase it prints: request latency (median, max, in ms),
whether every request stayed distributed and exact, one store round trip of a fresh client (what a joining
device or the API's store watch sees), and rank 0's resident memory. Timings on a busy host are noisy: the
host load is printed beside them. Nothing is asserted: this is a measurement (docs/SECURITY.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from edgeprism.api.store_watch import probe_store, rss_bytes
from edgeprism.models.config import get_config
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile
from edgeprism.runtime import EngineConfig, launch_local


def stranger(mode: str, host: str, port: int, count: int, mib: int, seconds: float) -> None:
    """The flood, in this (child) process until killed or `seconds` pass."""
    if mode == "connections":
        held = []
        for _ in range(count):
            try:
                held.append(socket.create_connection((host, port), timeout=5))
            except OSError as err:
                print(f"stranger: connection {len(held) + 1} failed: {err}", file=sys.stderr, flush=True)
                break
        print(f"stranger: holding {len(held)} connections", file=sys.stderr, flush=True)
        print("ready", flush=True)
        time.sleep(seconds)
    elif mode == "clients":
        stop = time.monotonic() + seconds

        def hammer(i: int) -> None:
            store = dist.TCPStore(host, port, None, False, timedelta(seconds=10))
            n = 0
            while time.monotonic() < stop:
                store.set(f"flood/{i}/{n % 64}", b"x" * 1024)
                store.get(f"flood/{i}/{n % 64}")
                n += 1

        threads = [threading.Thread(target=hammer, args=(i,), daemon=True) for i in range(count)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        print("ready", flush=True)
        for t in threads:
            t.join()
    elif mode == "big":
        store = dist.TCPStore(host, port, None, False, timedelta(seconds=60))
        for i in range(count):
            store.set(f"flood/big{i}", os.urandom(mib << 20))
        print(f"stranger: wrote {count} x {mib} MiB", file=sys.stderr, flush=True)
        print("ready", flush=True)
        time.sleep(seconds)


def measure(engine, inputs, reference, host: str, port: int, requests: int) -> dict:
    latencies, exact, distributed = [], True, True
    for _ in range(requests):
        result = engine.infer(inputs)
        latencies.append(result.metrics.latency_s * 1e3)
        distributed &= result.metrics.mode == "distributed" and not result.metrics.fallback
        exact &= all(torch.allclose(v, reference[k], atol=1e-5, rtol=0) for k, v in result.outputs.items())
    latencies.sort()
    probe = probe_store(host, port, timeout_s=30.0)
    return {"median_ms": round(latencies[len(latencies) // 2], 2), "max_ms": round(latencies[-1], 2),
            "distributed": distributed, "exact": exact,
            "store_probe_ms": None if probe is None else round(probe[0] * 1e3, 2), "store_keys": probe and probe[1],
            "rss_mib": round(rss_bytes() / 2**20, 1), "load": os.getloadavg()[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--big-values", type=int, default=32)
    p.add_argument("--big-mib", type=int, default=8)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--nofile", type=int, metavar="N",
                   help="lower this process's (rank 0's) soft limit of open files to N first, as on a device whose "
                        "default is 1024; with --connections above it the flood exhausts rank 0's descriptors")
    p.add_argument("--json", action="store_true")
    p.add_argument("--stranger", nargs=6, metavar=("MODE", "HOST", "PORT", "COUNT", "MIB", "SECONDS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stranger:
        mode, host, port, count, mib, seconds = args.stranger
        stranger(mode, host, int(port), int(count), int(mib), float(seconds))
        return 0

    if args.nofile:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    vit = get_config("vit-tiny-test")
    profile = synthetic_profile(vit.name, device_speeds=(1.0, 1.0), bandwidth_bps=1e9, latency_s=1e-4,
                                seconds_per_image=3000, codecs=synthetic_codecs(vit.hidden_size)[:1])
    config = EngineConfig(join_check_s=0.05, learn_compute=False, learn_link=False, learn_speeds=False,
                          seal_lanes="on", min_stall_s=5.0)
    inputs = synthetic_inputs(vit, 2, seed=7)
    rows = {}
    with launch_local(2, vit.name, profile, config=config) as engine:
        with torch.no_grad():
            reference = engine.model(inputs)
        host, _, port_text = engine.address.rpartition(":")
        port = int(port_text)
        engine.infer(inputs)  # warm-up
        rows["baseline"] = measure(engine, inputs, reference, host, port, args.requests)
        for mode, count, settle_s in (("connections", args.connections, 1.0), ("clients", args.clients, 1.0),
                                      ("big", args.big_values, 0.0)):
            child = subprocess.Popen([sys.executable, __file__, "--stranger", mode, host, str(port), str(count),
                                      str(args.big_mib), "600"], stdout=subprocess.PIPE, text=True)
            try:
                assert child.stdout is not None
                child.stdout.readline()  # "ready": the flood is on
                time.sleep(settle_s)
                rows[mode] = measure(engine, inputs, reference, host, port, args.requests)
            finally:
                child.kill()
                child.wait()
    for name, row in rows.items():
        print(json.dumps({"phase": name, **row}) if args.json else f"{name:12s} {row}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
