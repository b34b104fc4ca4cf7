"""Exactness self-check: the position-wise split with full exchange (CR = 1) equals one device.

A rank function (`edgeprism.comm.job`), so it runs under any launcher (`comm.launch.run_job`, torchrun,
testbed hosts); rank 0 returns `{"world_size", "shares", "codec", "max_abs_diff": {model: diff}}`:

    torchrun --nproc-per-node 3 -m edgeprism.comm.job edgeprism.partition.selfcheck:selfcheck \
        --args '{"shares": [0.5, 0.3, 0.2]}'
"""

from __future__ import annotations

from typing import Any

import torch

from edgeprism.comm.context import DistContext
from edgeprism.compress.registry import get_codec
from edgeprism.models.loading import build_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.partition.transform import PositionWise

# (model, batch, seq_len, padded): every family, batch > 1, padded text.
CASES = (("vit-tiny-test", 2, None, False), ("dinov2-tiny-test", 2, None, False),
         ("bert-tiny-test", 3, 21, True), ("gpt2-tiny-test", 2, 19, False), ("llama-tiny", 2, 19, True))


def selfcheck(ctx: DistContext, args: dict[str, Any], progress: Any = None) -> dict | None:
    """Every case of CASES (or `args["models"]`) split by `args["shares"]` (default equal) with
    `args["codec"]` (default fp32), against the model on one device."""
    shares = tuple(float(x) for x in args["shares"]) if args.get("shares") else None
    codec = str(args.get("codec", "fp32"))
    models = tuple(args["models"]) if args.get("models") else None
    results = {}
    for name, batch, seq_len, padded in CASES:
        if models and name not in models:
            continue
        model = build_model(name, seed=3)
        engine = PositionWise(model, ctx, get_codec(codec))
        engine.verify_peers()
        inputs = synthetic_inputs(model.config, batch, seq_len=seq_len, padded=padded, seed=7) if ctx.is_root else None
        outputs = engine.forward(inputs, shares, gather_hidden=True)
        if ctx.is_root:
            assert outputs is not None, "rank 0 gets the outputs"
            with torch.no_grad():
                reference = model(inputs)
            results[name] = max(float((outputs[k] - reference[k]).abs().max()) for k in outputs if k in reference)
    if not ctx.is_root:
        return None
    return {"world_size": ctx.world_size, "shares": shares, "codec": codec, "max_abs_diff": results}
