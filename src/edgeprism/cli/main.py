"""The `edgeprism` command: a thin shell over library calls.

Each sub-command lives in its own module under `edgeprism.cli` and exposes
`add_parser(subparsers)`; the module registers its handler with `set_defaults(handler=...)`.
A handler returns the process exit code. Only `cli/` writes to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from edgeprism.cli.model_arg import resolve_model_argument

# Module names under edgeprism.cli, in the order `--help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "demo",
    "run",
    "eval",
    "calibrate",
    "plan",
    "profile",
    "serve",
    "join",
    "testbed",
    "link_test",
    "assets",
    "bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeprism",
        description="Run one Transformer inference across several small devices.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"edgeprism.cli.{name}")
        module.add_parser(subparsers)
    return parser


def configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        resolve_model_argument(args)
        return int(args.handler(args) or 0)
    except ValueError as err:
        # Users' mistakes: one clear line, no traceback.
        print(f"edgeprism {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
