"""The one process main of a job: every rank runs one rank function, like `torch.multiprocessing.spawn(fn)`.

    python -m edgeprism.comm.job edgeprism.partition.selfcheck:selfcheck --args '{"shares": [0.6, 0.4]}' \
        [--out result.json] [--progress progress.txt] [--backend auto] [--device cpu] [--timeout-s 900]

A rank function is a plain module-level function `fn(ctx, args, progress) -> result | None` that lives
in its own room (`profile/compute.py`, `testbed/linktest.py`, `runtime/batch.py`, `jobs/validate.py`,
`bench/`, `partition/selfcheck.py`). It is named by reference, `module:function`, as `spawn` pickles a
function: the room that launches a job hands over its own function (`comm.launch.run_job`), so this
low room never names a higher one, and there is no registry to keep in step.

This module owns what every rank does around the function, once: arguments, logging (one format, with
the rank), `init_distributed` with one timeout policy, a stack dump when the launcher stops a hung
rank, shutdown, and results. Rank 0's return value is written as JSON to `--out` (without `--out`, as
one stdout line starting with RESULT_PREFIX: this is a process entry point, like `cli/`); `progress(line)`
appends a line to `--progress` on rank 0 and does nothing elsewhere. A failing rank logs its error with
the traceback and exits 1; the launcher stops the others and raises with its stderr.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import importlib
import json
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from edgeprism.comm.context import DistContext, init_distributed, shutdown

log = logging.getLogger(__name__)

ENTRY_MODULE = "edgeprism.comm.job"
"""What launchers run: `python -m edgeprism.comm.job ...` (`comm.launch.job_argv`)."""
RESULT_PREFIX = "EDGEPRISM_RESULT "
"""Without `--out`, rank 0 prints its result as one stdout line starting with this."""
COLLECTIVE_TIMEOUT_S = 900.0
"""The timeout policy: a collective waits at most this long, or as long as the whole job may run if
that is shorter (the launcher passes `min(job timeout, COLLECTIVE_TIMEOUT_S)` as `--timeout-s`)."""
LOG_FORMAT = "%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"

Progress = Callable[[str], None]
"""`progress(line)`: rank 0 reports one line (no newline) to whoever launched the job."""
RankFunction = Callable[[DistContext, dict, Progress], Any]
"""`fn(ctx, args, progress) -> result | None`: rank 0's return value is the job's result."""


def collective_timeout_s(job_timeout_s: float) -> float:
    """The one timeout policy: collectives give up with the job, and after COLLECTIVE_TIMEOUT_S at most."""
    return min(float(job_timeout_s), COLLECTIVE_TIMEOUT_S)


def function_name(fn: RankFunction) -> str:
    """`module:qualname` of a module-level function — what a rank imports to find it."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        raise ValueError(f"rank function {fn!r} must be a module-level function of an importable module "
                         f"(got module {module!r}, name {qualname!r})")
    return f"{module}:{qualname}"


def resolve(name: str) -> RankFunction:
    """The function `module:qualname` names (the inverse of `function_name`)."""
    module_name, _, qualname = name.partition(":")
    if not module_name or not qualname:
        raise ValueError(f"rank function {name!r}: expected 'package.module:function'")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"rank function {name!r} is not callable")
    return target


def _read_args(text: str) -> dict:
    """`--args` is JSON text, or `@FILE` holding it (a launcher's args can outgrow one argv entry)."""
    if text.startswith("@"):
        with open(text[1:]) as handle:
            text = handle.read()
    args = json.loads(text)
    if not isinstance(args, dict):
        raise ValueError(f"--args must be a JSON object, got {type(args).__name__}")
    return args


def _progress_to(path: str | None, is_root: bool) -> Progress:
    def progress(line: str) -> None:
        if is_root and path:
            with open(path, "a") as handle:
                handle.write(line.replace("\n", " ") + "\n")
    return progress


def _configure_logging(level: int, rank: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format=LOG_FORMAT.format(rank=rank), force=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m " + ENTRY_MODULE, description=__doc__.splitlines()[0])
    parser.add_argument("function", help="the rank function, 'package.module:function'")
    parser.add_argument("--args", default="{}", help="its arguments: a JSON object, or @FILE holding one")
    parser.add_argument("--out", help="rank 0 writes its result here as JSON (default: one stdout line)")
    parser.add_argument("--progress", help="rank 0 appends progress lines here")
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout-s", type=float, default=COLLECTIVE_TIMEOUT_S,
                        help="how long one collective may wait (the launcher passes its policy)")
    parser.add_argument("--log-level", default="WARNING")
    options = parser.parse_args(argv)
    level = getattr(logging, options.log_level.upper(), logging.WARNING)
    _configure_logging(level, "?")
    fn = resolve(options.function)
    args = _read_args(options.args)
    # A rank the launcher stops for hanging (SIGTERM, then SIGKILL) says where it hung.
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    ctx = init_distributed(options.backend, options.device, timeout_s=options.timeout_s)
    _configure_logging(level, str(ctx.group_rank))
    result: Any = None
    failed = False
    try:
        result = fn(ctx, args, _progress_to(options.progress, ctx.is_root))
    except Exception:
        failed = True
        log.exception("rank %d: %s failed", ctx.group_rank, options.function)
    finally:
        # Groups and models the function made are freed before the process group goes: freed at
        # interpreter exit instead, a GLOO group's C++ destructor can abort the process.
        gc.collect()
        shutdown(ctx)
    if failed:
        return 1
    if ctx.is_root:
        text = json.dumps(result)
        if options.out:
            with open(options.out, "w") as handle:
                handle.write(text + "\n")
        else:
            print(RESULT_PREFIX + text, flush=True)
    return 0


__all__ = ["COLLECTIVE_TIMEOUT_S", "ENTRY_MODULE", "RESULT_PREFIX", "Progress", "RankFunction",
           "collective_timeout_s", "function_name", "main", "resolve"]

if __name__ == "__main__":
    sys.exit(main())
