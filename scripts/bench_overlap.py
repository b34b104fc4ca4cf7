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

from edgeprism.bench.overlap import add_overlap_arguments, run_overlap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_overlap_arguments(parser, codec="fp16", repeats=5)
    args = parser.parse_args()
    result = run_overlap(args, on_progress=print)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['model']} x{result['world_size']}, codec {result['codec']}, {result['emulation']}; "
          f"load {result['load_avg_before'][0]:.1f} -> {result['load_avg_after'][0]:.1f} on {os.cpu_count()} cores")
    print(f"{'batch':>5} {'overlap ms':>11} {'plain ms':>9} {'overlap/plain':>14}")
    for p in result["points"]:
        print(f"{p['batch']:>5} {p['overlap_median_s'] * 1e3:>11.1f} {p['plain_median_s'] * 1e3:>9.1f} "
              f"{p['overlap_over_plain_median']:>14.3f}")


if __name__ == "__main__":
    main()
