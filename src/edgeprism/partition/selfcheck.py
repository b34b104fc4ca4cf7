"""Exactness self-check: the position-wise split with full exchange (CR = 1) equals one device.

Runs under any launcher (local launcher, torchrun, testbed hosts); rank 0 prints one JSON line:

    torchrun --nproc-per-node 3 -m edgeprism.partition.selfcheck --shares 0.5,0.3,0.2
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from edgeprism.comm.context import init_distributed, shutdown
from edgeprism.compress.registry import get_codec
from edgeprism.models.loading import build_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.partition.transform import PositionWise

# (model, batch, seq_len, padded): every family, batch > 1, padded text.
CASES = (("vit-tiny-test", 2, None, False), ("dinov2-tiny-test", 2, None, False),
         ("bert-tiny-test", 3, 21, True), ("gpt2-tiny-test", 2, 19, False))


def run_checks(
    shares: tuple[float, ...] | None, codec: str = "fp32", models: tuple[str, ...] | None = None
) -> dict | None:
    ctx = init_distributed()
    results = {}
    try:
        for name, batch, seq_len, padded in CASES:
            if models and name not in models:
                continue
            model = build_model(name, seed=3)
            engine = PositionWise(model, ctx, get_codec(codec))
            engine.verify_peers()
            inputs = (
                synthetic_inputs(model.config, batch, seq_len=seq_len, padded=padded, seed=7) if ctx.is_root else None
            )
            outputs = engine.forward(inputs, shares, gather_hidden=True)
            if ctx.is_root:
                assert outputs is not None, "rank 0 gets the outputs"
                with torch.no_grad():
                    reference = model(inputs)
                results[name] = max(float((outputs[k] - reference[k]).abs().max()) for k in outputs if k in reference)
    finally:
        shutdown(ctx)
    return (
        {"world_size": ctx.world_size, "shares": shares, "codec": codec, "max_abs_diff": results}
        if ctx.is_root
        else None
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", help="comma-separated token shares (default equal)")
    parser.add_argument("--codec", default="fp32")
    parser.add_argument("--models", help="comma-separated subset of " + ",".join(c[0] for c in CASES))
    args = parser.parse_args(argv)
    shares = tuple(float(x) for x in args.shares.split(",")) if args.shares else None
    models = tuple(args.models.split(",")) if args.models else None
    report = run_checks(shares, args.codec, models)
    if report is not None:
        print("EDGEPRISM_SELFCHECK " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
