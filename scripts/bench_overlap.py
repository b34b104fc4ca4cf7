"""Latency of the position-wise split with the exchange overlapped with compute, against without (a
printout, not a test): 2 emulated devices of one core, one link preset, requests interleaved.

    python scripts/bench_overlap.py [--model vit-base-patch16-224] [--link wifi4] [--codec fp16]
                                    [--batches 1,8] [--repeats 5] [--backend auto]

Prints the median latency of each variant per batch and the median of the paired ratios (overlap / plain,
same round), with the host load before and after: a busy host makes both slower and the ratio noisier.
"""

from __future__ import annotations

import argparse
import json
import os

from edgeprism.bench.overlap import overlap_rank
from edgeprism.comm.launch import JobSession
from edgeprism.testbed.presets import get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-base-patch16-224")
    parser.add_argument("--link", default="wifi4")
    parser.add_argument("--codec", default="fp16")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backend", default="auto", choices=("auto", "netns", "loopback"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with JobSession(2, get_preset(args.link), backend=args.backend, timeout_s=1800) as session:
        result = session.run(overlap_rank, {"model": args.model, "codec": args.codec, "repeats": args.repeats,
                                            "warmup": args.warmup,
                                            "batches": [int(b) for b in args.batches.split(",")]},
                             on_progress=print)
        result["emulation"] = session.emulation
    result["load_avg_before"], result["load_avg_after"] = load_before, os.getloadavg()
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['model']} x{result['world_size']}, codec {result['codec']}, {result['emulation']}; "
          f"load {load_before[0]:.1f} -> {result['load_avg_after'][0]:.1f} on {os.cpu_count()} cores")
    print(f"{'batch':>5} {'overlap ms':>11} {'plain ms':>9} {'overlap/plain':>14}")
    for p in result["points"]:
        print(f"{p['batch']:>5} {p['overlap_median_s'] * 1e3:>11.1f} {p['plain_median_s'] * 1e3:>9.1f} "
              f"{p['overlap_over_plain_median']:>14.3f}")


if __name__ == "__main__":
    main()
