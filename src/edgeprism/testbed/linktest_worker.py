"""Link-test worker: run under torchrun, one process per host; rank 0 reports the measurement.

    python -m torch.distributed.run ... -m edgeprism.testbed.linktest_worker [--out FILE]

This module is a process entry point (a command shell like `cli/`), so it writes its one result
line to stdout: `{"link_test": {...LinkMeasurement...}}` on rank 0, and to `--out` when given.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import logging
import os
import signal
import sys

import torch.distributed as dist

from edgeprism.testbed.emulation import EmulatedLink
from edgeprism.testbed.linktest import measure_link

RESULT_KEY = "link_test"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeprism.testbed.linktest_worker")
    parser.add_argument("--out", help="also write rank 0's JSON result to this file")
    parser.add_argument("--latency-repeats", type=int, default=20)
    parser.add_argument("--bandwidth-target-s", type=float, default=0.25)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="GLOO timeout of each collective")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s [%(process)d] %(name)s: %(message)s")

    # A rank killed for hanging (launcher timeout) says where it hung.
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    link = EmulatedLink.from_env(os.environ)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout_s))
    try:
        measurement = measure_link(
            link=link, latency_repeats=args.latency_repeats, bandwidth_target_s=args.bandwidth_target_s
        )
        if dist.get_rank() == 0:
            line = json.dumps({RESULT_KEY: measurement.to_json()})
            print(line, flush=True)
            if args.out:
                with open(args.out, "w") as fh:
                    fh.write(line + "\n")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
