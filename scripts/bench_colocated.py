"""What co-locating emulated devices on this machine costs a distributed plan (a printout, not a test; root).

    sudo python scripts/bench_colocated.py [--speeds 0.5,0.5,0.5,0.5] [--model vit-base-patch16-224] [--batch 8]

`edgeprism.bench.colocated`: one testbed host per speed (CPU quotas), no exchange at all. Rank 0 times one
device's whole layer alone; then every rank times its split layer (own tokens + the received tokens' K/V
projections, 2 micro-batches, the codec's encode/decode) at the same moment; then rank 0 alone again. The same two
layers timed in this process, unthrottled, give the exact ratio. Prints per rank the split layer, the one-device
layer, their ratio on the testbed and in-process, and the quotient (1.0: co-location costs nothing beyond the
quotas), with the host's load before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics

from edgeprism.bench.colocated import colocated_rank, inprocess_ratio
from edgeprism.comm.launch import JobSession
from edgeprism.testbed.presets import get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speeds", default="0.5,0.5,0.5,0.5")
    parser.add_argument("--model", default="vit-base-patch16-224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--link", default="wifi4")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_colocated.py needs root (CPU quotas: cgroups; namespaces); run it with sudo")
        raise SystemExit(2)
    speeds = [float(s) for s in args.speeds.split(",")]
    load_before = os.getloadavg()[0]
    exact = inprocess_ratio(args.model, args.batch, len(speeds))
    with JobSession(len(speeds), get_preset(args.link), timeout_s=1800, speeds=speeds) as session:
        rows = session.run(colocated_rank, {"model": args.model, "batch": args.batch, "repeats": args.repeats})
    load_after = os.getloadavg()[0]
    root = rows[0]
    one_device = statistics.mean([root["one_device_ms_before"], root["one_device_ms_after"]])
    print(f"{args.model} batch {args.batch}, {len(speeds)} hosts of {args.speeds} cores on {os.cpu_count()} cores; "
          f"load {load_before:.1f} -> {load_after:.1f}")
    print(f"in this process, unthrottled: one device {exact['one_device_ms']:.1f} ms, split layer "
          f"{exact['split_ms']:.1f} ms, ratio {exact['ratio']:.3f}")
    print(f"testbed: one device (rank 0 alone, quota {speeds[0]:g}) {root['one_device_ms_before']:.1f} / "
          f"{root['one_device_ms_after']:.1f} ms (before / after)")
    for row in rows:
        ratio = row["split_ms"] / one_device
        print(f"  rank {row['rank']} (quota {speeds[row['rank']]:g}): split layer {row['split_ms']:.1f} ms, ratio "
              f"{ratio:.3f}, x{ratio / exact['ratio'] * speeds[row['rank']] / speeds[0]:.2f} the in-process ratio")


if __name__ == "__main__":
    main()
