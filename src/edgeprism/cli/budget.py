"""The fidelity budget's two flags, the same on every command that plans (plan, serve, demo, bench)."""

from __future__ import annotations

import argparse

from edgeprism.plan import DEFAULT_MAX_FIDELITY_LOSS

ALLOW_UNMEASURED_HELP = ("opt in to codecs whose fidelity for this model was never measured (random weights, speed "
                         "only): their answers may differ from one device's, and every row says fidelity_loss null")


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """--max-fidelity-loss (default 1 %) and --allow-unmeasured-codecs (off)."""
    parser.add_argument("--max-fidelity-loss", type=float, default=DEFAULT_MAX_FIDELITY_LOSS, metavar="LOSS",
                        help=f"largest measured normalised metric loss a codec may have, in [0, 1] (default "
                             f"{DEFAULT_MAX_FIDELITY_LOSS}: 1 %%)")
    parser.add_argument("--allow-unmeasured-codecs", action="store_true", help=ALLOW_UNMEASURED_HELP)


__all__ = ["ALLOW_UNMEASURED_HELP", "add_budget_arguments"]
