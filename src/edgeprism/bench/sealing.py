"""What sealing the data lanes costs a distributed request: the same request with and without sealing,
interleaved, per codec (`scripts/bench_sealing.py` runs it over a testbed link; docs/SECURITY.md has the
numbers).

A rank function (edgeprism.comm.job): every rank builds the model and one `PositionWise` per codec over the
job's group; each round runs every codec once sealed and once not, in an order that alternates between
rounds, after a one-byte all-gather that lines the ranks up. Each codec's lane has its own key (no nonce is
ever used twice under one key). Rank 0 returns one row per timed request.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from edgeprism.comm.context import DistContext
from edgeprism.comm.sealing import LaneSealer, lane_key
from edgeprism.compress.registry import get_codec
from edgeprism.models.loading import build_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.partition.transform import PositionWise

_BENCH_SECRET = b"edgeprism bench: sealing cost, not a cluster secret"


def sealing_rank(ctx: DistContext, args: dict[str, Any], progress: Any = None) -> list[dict] | None:
    """args: model, codecs (names), batch, seq_len (text models), warmup, repeats, seed."""
    model = build_model(str(args["model"]), seed=int(args.get("seed", 0))).eval()
    codecs = [str(c) for c in args["codecs"]]
    ranks = tuple(range(ctx.world_size))
    lanes = {name: PositionWise(model, ctx, get_codec(name)) for name in codecs}
    sealers = {name: LaneSealer(lane_key(_BENCH_SECRET, b"\0" * 16, i, ranks), ctx.group_rank)
               for i, name in enumerate(codecs)}
    inputs = (synthetic_inputs(model.config, int(args.get("batch", 1)), seq_len=args.get("seq_len"), seed=1)
              if ctx.is_root else None)
    warmup, repeats = int(args.get("warmup", 2)), int(args.get("repeats", 10))
    rows = []
    for round_ in range(warmup + repeats):
        order = (False, True) if round_ % 2 == 0 else (True, False)
        for name in codecs:
            for sealed in order:
                lane = lanes[name]
                exchanger = lane.exchanger
                exchanger.sealer = None
                exchanger.all_gather_bytes(torch.zeros(1, dtype=torch.uint8), [1] * ctx.world_size, kind="sync")
                exchanger.sealer = sealers[name] if sealed else None
                exchanger.reset_stats()
                start = time.perf_counter()
                with torch.no_grad():
                    lane.forward(inputs)
                latency_s = time.perf_counter() - start
                stats = exchanger.stats
                if ctx.is_root and round_ >= warmup:
                    rows.append({"codec": name, "sealed": sealed, "round": round_ - warmup, "latency_s": latency_s,
                                 "nbytes_sent": stats.nbytes_sent,
                                 "layer_nbytes": stats.per_kind_nbytes.get("layer", 0), "sealing_s": stats.sealing_s,
                                 "messages": sum(stats.per_kind_messages.values())})
        if ctx.is_root and progress is not None:
            progress(f"round {round_ + 1}/{warmup + repeats}")
    return rows if ctx.is_root else None


__all__ = ["sealing_rank"]
