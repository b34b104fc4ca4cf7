"""Chaos under load on the testbed (root): a seeded, reproducible run of `edgeprism.bench.chaos`.

    sudo python scripts/chaos.py [--requests 2000] [--clients 8] [--hosts 4] [--seed 0] [--json]

Brings up `--hosts` quota-emulated devices (network namespaces, wifi4), `edgeprism serve --listen --http`
on host 0 and `edgeprism join` on the others (MiniLM-L6 from `make assets`, a lossless fp32 profile),
sends the requests from `--clients` concurrent HTTP clients while a seeded scheduler SIGKILLs and
restarts devices, cuts and restores links, lowers CPU quotas and sags links. Every answer is checked
against one device's (cosine >= 1 - 1e-5). Prints a table (or the summary JSON); the summary, the
per-request rows, the fault log and every process's log are kept in `--workdir`.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from edgeprism.bench.chaos import ChaosRunConfig, run_chaos
from edgeprism.testbed.chaos import ChaosConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--hosts", type=int, default=4, help="testbed hosts: the coordinator's and the devices'")
    parser.add_argument("--speeds", default="", help="CPU quota per host, e.g. 0.5,0.5,0.5,0.5 (default 0.5 each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mean-gap", type=float, default=6.0, help="mean seconds between faults (default 6)")
    parser.add_argument("--kinds", default="kill,cut,slow,sag", help="fault kinds (default all four)")
    parser.add_argument("--workdir", help="where logs and rows go (default: a new temp folder)")
    parser.add_argument("--json", action="store_true", help="print the summary JSON instead of the table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    chaos = ChaosConfig(seed=args.seed, mean_gap_s=args.mean_gap, kinds=tuple(args.kinds.split(",")))
    speeds = tuple(float(v) for v in args.speeds.split(",")) if args.speeds else ()
    config = ChaosRunConfig(requests=args.requests, clients=args.clients, hosts=args.hosts, speeds=speeds,
                            chaos=chaos)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="edgeprism-chaos-"))
    summary = run_chaos(config, workdir)
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    lat = summary["latency_ms"]
    print(f"chaos run: seed {args.seed}, {args.hosts} hosts, {args.clients} clients, {summary['wall_s']} s, "
          f"load {summary['load_avg_1m'][0]} -> {summary['load_avg_1m'][1]}; rows in {workdir}")
    print(f"{'requests':>9} {'lost':>5} {'mismatch':>8} {'fallbacks':>9} {'retried':>7} "
          f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    print(f"{summary['requests']:>9} {summary['lost']:>5} {summary['mismatches']:>8} {summary['fallbacks']:>9} "
          f"{summary['retried']:>7} {lat['p50']:>8} {lat['p95']:>8} {lat['p99']:>8} {lat['p100']:>8}")
    print(f"min cosine {summary['min_cosine']}; modes {summary['modes']}; fallbacks in /metrics "
          f"{summary['fallbacks_metric']}")
    print(f"faults applied {summary['events']} (errors: {len(summary['event_errors'])}); "
          f"restarts {summary['restarts']}")
    print(f"{'process':<20} {'pid start/end':>15} {'RSS start MB':>12} {'RSS end MB':>10} {'growth MB':>9} "
          f"{'fds start/end':>13}")
    for name, pair in summary["processes"].items():
        start, end = pair["start"] or {}, pair["end"] or {}
        same = start.get("pid") == end.get("pid")
        growth = round(end["rss_mb"] - start["rss_mb"], 1) if same and "rss_mb" in end and "rss_mb" in start else "-"
        print(f"{name:<20} {start.get('pid', '-')!s:>7}/{end.get('pid', '-')!s:<7} {start.get('rss_mb', '-')!s:>12} "
              f"{end.get('rss_mb', '-')!s:>10} {growth!s:>9} {start.get('fds', '-')!s:>6}/{end.get('fds', '-')!s:<6}")


if __name__ == "__main__":
    main()
