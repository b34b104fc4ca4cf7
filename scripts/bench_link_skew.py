"""What the live link estimate reads from all-gathers whose ranks arrive skewed (issue 17; a printout, root for the
netns testbed and CPU quotas):

    python scripts/bench_link_skew.py --hosts 4 --speed 0.5            # 4 x 0.5 core over wifi4, 300 KB messages

Per skew bound (ranks issue each exchange after a random lead of up to it) and mode (sync: a sleep then a blocking
all-gather; overlap: busy compute, the all-gather in the background beside more compute), prints the least rank time
per layer (what the estimate reads now), the pairing rule's reading (before) and the wire model of the preset.
A reading that grows with the skew is reading compute skew as link time (`edgeprism.bench.link_skew`).
"""

from __future__ import annotations

import argparse
import json
import os

from edgeprism.bench.link_skew import link_skew_rank
from edgeprism.comm.launch import JobSession
from edgeprism.testbed.presets import get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--speed", type=float, default=0.5, help="CPU quota per host, in cores")
    parser.add_argument("--link", default="wifi4")
    parser.add_argument("--nbytes", type=int, default=300_000, help="bytes each rank sends per all-gather")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--skews", default="0,0.05,0.15,0.3", help="skew bounds, seconds")
    parser.add_argument("--modes", default="sync,overlap")
    parser.add_argument("--compute", type=float, default=0.2, help="overlap mode: compute beside each exchange, s")
    parser.add_argument("--backend", default="netns", choices=("auto", "netns", "loopback"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    link, k = get_preset(args.link), args.hosts
    load_before = os.getloadavg()
    with JobSession(k, link, backend=args.backend, speeds=(args.speed,) * k, timeout_s=900) as session:
        rows = session.run(link_skew_rank, {"nbytes": args.nbytes, "layers": args.layers, "seed": 1,
                                            "skews": [float(s) for s in args.skews.split(",")],
                                            "modes": args.modes.split(","), "compute_s": args.compute},
                           dist_backend="gloo")
        emulation = session.emulation
    wire_s = link.delay_s * (k - 1) + 8 * (k - 1) * args.nbytes / link.rate_bps  # no burst, no protocol overhead
    if args.json:
        print(json.dumps({"rows": rows, "wire_model_s": wire_s, "emulation": emulation,
                          "load_avg_before": load_before, "load_avg_after": os.getloadavg()}))
        return
    print(f"{k} hosts x {args.speed:g} core, {emulation}; {args.nbytes} B per rank per all-gather; wire model "
          f"{wire_s * 1e3:.1f} ms; load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'mode':>8} {'skew<= s':>8} {'least ms':>9} {'paired ms (before)':>19}")
    for row in rows:
        paired = row["paired_s"]
        print(f"{row['mode']:>8} {row['skew_s']:>8.2f} {row['least_s'] * 1e3:>9.1f} "
              f"{'-' if paired is None else f'{paired * 1e3:.1f}':>19}")


if __name__ == "__main__":
    main()
