"""How exact a testbed host's CPU quota is (a printout, not a test; root, cgroup cpu controller).

    sudo python scripts/bench_cpu_quota.py [--periods 100000,20000,10000] [--ops 120]

One worker process, pinned to one core, sits in a fresh cgroup (`edgeprism.testbed.cpu`). For each CFS
period and each quota (1.0, 0.5, 0.25 of a core) it times `--ops` matmuls of about a transformer layer's
size at batch 1 (two 197x768 @ 768x3072: ~22 ms unthrottled here), one by one, in interleaved rounds.
Printed per (period, quota): the median time per op, its ratio to the unthrottled median (ideal
1 / quota), and the spread: p90 / p10 of the per-op times (1.0 = every op took the same time). A
throttled op either runs at once or waits for the next period, so the spread shows how finely the
quota is cut; docs/TESTBED.md records the result and why the default period is what it is.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from edgeprism.testbed.cpu import enter_prefix, find_controller, make_group, remove_group, set_quota

WORKER = r"""
import sys, time, torch
torch.set_num_threads(1)
a = torch.randn(197, 768); w = torch.randn(768, 3072)
for _ in range(20): a @ w
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    times = []
    for _ in range(n):
        t = time.perf_counter(); a @ w; a @ w; times.append(time.perf_counter() - t)
    print(" ".join(f"{x:.6f}" for x in times), flush=True)
"""


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--periods", default="100000,20000,10000", help="CFS periods in µs")
    parser.add_argument("--quotas", default="1.0,0.5,0.25", help="quotas in cores")
    parser.add_argument("--ops", type=int, default=120, help="timed ops per (period, quota)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds over all settings")
    parser.add_argument("--core", type=int, default=0)
    args = parser.parse_args()
    controller = find_controller()
    if controller is None:
        sys.exit("needs root and a writable cgroup cpu controller")
    path = make_group(controller, f"edgeprism-quota-bench-{os.getpid()}", 1.0)
    try:
        worker = subprocess.Popen([*enter_prefix(path), "taskset", "-c", str(args.core), sys.executable, "-c", WORKER],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert worker.stdout is not None and worker.stdin is not None
        worker.stdout.readline()
        print(f"load average: {os.getloadavg()}")
        periods = [int(p) for p in args.periods.split(",")]
        quotas = [float(q) for q in args.quotas.split(",")]
        times: dict[tuple[int, float], list[float]] = {(p, q): [] for p in periods for q in quotas}
        # Interleaved in rounds, so that a change in the machine's load falls on every setting alike.
        per_round = max(1, args.ops // args.rounds)
        for _ in range(args.rounds):
            for period in periods:
                for quota in quotas:
                    set_quota(controller, path, quota, period)
                    worker.stdin.write(f"{per_round}\n")
                    worker.stdin.flush()
                    times[period, quota] += [float(x) for x in worker.stdout.readline().split()]
        print(f"{'period ms':>9} {'quota':>5} {'median ms':>9} {'ratio':>6} {'ideal':>6} {'p90/p10':>7}")
        for period in periods:
            base = _quantile(times[period, quotas[0]], 0.5) * quotas[0]
            for quota in quotas:
                mine = times[period, quota]
                median = _quantile(mine, 0.5)
                print(f"{period / 1000:>9g} {quota:>5g} {median * 1e3:>9.2f} {median / base:>6.2f} {1 / quota:>6.2f} "
                      f"{_quantile(mine, 0.9) / _quantile(mine, 0.1):>7.2f}", flush=True)
        worker.stdin.close()
        worker.wait(timeout=10)
        print(f"load average: {os.getloadavg()}")
    finally:
        remove_group(path)


if __name__ == "__main__":
    main()
