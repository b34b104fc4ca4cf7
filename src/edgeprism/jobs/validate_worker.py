"""Validation worker: run several `BatchSpec`s in one process group, one JSON line per result.

    python -m edgeprism.jobs.validate_worker --specs specs.json --out results.jsonl

Launched on every device of a `LinkSession` (testbed hosts or local workers). Each spec goes
through `edgeprism.runtime.batch_worker.run_batch`, the same code `edgeprism run` measures with;
rank 0 appends each result to `--out` as soon as it has it (so the parent can show progress). This
module is a process entry point, like `cli/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from edgeprism.comm.context import init_distributed, shutdown
from edgeprism.runtime.batch_worker import BatchSpec, run_batch

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeprism.jobs.validate_worker")
    parser.add_argument("--specs", required=True, help="JSON file: a list of BatchSpec objects")
    parser.add_argument("--out", required=True, help="rank 0 appends one JSON result per line")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="GLOO timeout of each collective")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [rank %(process)d] %(name)s: %(message)s")
    with open(args.specs) as handle:
        specs = [BatchSpec(**{**s, "shares": tuple(s["shares"]) if s.get("shares") else None})
                 for s in json.load(handle)]
    if not specs:
        return 0
    ctx = init_distributed(specs[0].backend, specs[0].device, timeout_s=args.timeout_s)  # type: ignore[arg-type]
    try:
        for index, spec in enumerate(specs):
            result = run_batch(spec, ctx)
            if result is not None:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps({"index": index, **result}) + "\n")
    finally:
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
