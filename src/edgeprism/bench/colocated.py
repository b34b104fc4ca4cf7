"""Do emulated devices that share this machine compute as fast as their quotas say? (`scripts/bench_colocated.py`)

On the testbed, P devices are P processes with CPU quotas packed onto this machine's cores (testbed/cpu.py). A
split request's layer on one device is its own tokens' block plus the received tokens' K/V projections; the
baseline is one device running the whole layer alone. If the emulation were exact, the ratio of the two would be
what it is in one process on an idle core. This measures both sides with no exchange at all, so that only the
emulation differs: rank 0 times the one-device layer while the others wait; then every rank times its split layer
at the same moment (as in a request); then rank 0 alone again. The same two layers timed in one unthrottled
process (`inprocess_ratio`) give the exact ratio. Their quotient is what co-location costs a distributed plan
beyond the quotas (the host's other work — kernel networking, agents, other jobs — comes out of the same cores
when the quotas add up to every core; real devices each have their own).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from edgeprism.comm.context import DistContext
from edgeprism.compress.registry import get_codec
from edgeprism.models.loading import load_model
from edgeprism.partition.attend import remote_key_bias
from edgeprism.partition.overlap import OwnPart


def layer_steps(model_name: str, batch: int, world: int, codec_name: str = "int8", micro_batches: int = 2):
    """-> (one device's layer at `batch`, one rank's split layer: `micro_batches` slices of its own ceil(N/P)
    tokens attending over themselves and the N - n received ones, the codec's encode and decode included), each
    a callable of the layer index, on a model with seeded random weights."""
    torch.manual_seed(0)
    model = load_model(model_name, seed=0).eval()
    blocks = model.block_list()
    d, num_tokens = model.config.hidden_size, model.config.num_tokens()
    own = -(-num_tokens // world)
    rows = max(1, batch // micro_batches)
    codec = get_codec(codec_name)
    whole = torch.randn(batch, num_tokens, d)
    hidden, received = torch.randn(rows, own, d), torch.randn(rows, num_tokens - own, d)
    valid = torch.ones(rows, own, dtype=torch.bool)
    received_valid = torch.ones(rows, num_tokens - own, dtype=torch.bool)
    own_bias = torch.zeros(rows, 1, own, own)

    def one_device(layer: int) -> None:
        blocks[layer](whole)

    def split(layer: int) -> None:
        block = blocks[layer]
        for _ in range(micro_batches):
            sent = block.kv_input(hidden)
            codec.encode(sent, valid)
            part = OwnPart(block, sent, own_bias)
            remote, counts = codec.decode(codec.encode(received, received_valid))
            part.finish(hidden, remote, remote_key_bias(counts, True, torch.float32))

    return one_device, split, len(blocks)


def _timed_ms(step, layer: int) -> float:
    start = time.perf_counter()
    step(layer)
    return (time.perf_counter() - start) * 1e3


def _median_ms(step, num_layers: int, repeats: int) -> float:
    return statistics.median(_timed_ms(step, i % num_layers) for i in range(repeats))


def inprocess_ratio(model_name: str, batch: int, world: int, repeats: int = 9) -> dict[str, float]:
    """The two layers in this process, interleaved, unthrottled: {one_device_ms, split_ms, ratio}."""
    one_device, split, num_layers = layer_steps(model_name, batch, world)
    pairs = []
    with torch.no_grad():
        one_device(0), split(0)
        for i in range(repeats):
            pairs.append((_timed_ms(one_device, i % num_layers), _timed_ms(split, i % num_layers)))
    one, parted = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    return {"one_device_ms": one, "split_ms": parted, "ratio": parted / one}


def colocated_rank(ctx: DistContext, args: dict[str, Any], progress=None) -> list[dict] | None:
    """Rank function (`edgeprism.comm.job`): args {model, batch, repeats}. Rank 0 returns every rank's
    {rank, split_ms} with its own {one_device_ms_before, one_device_ms_after}."""
    one_device, split, num_layers = layer_steps(args["model"], args["batch"], ctx.world_size)
    repeats = args.get("repeats", 12)
    out: dict[str, Any] = {"rank": ctx.group_rank}
    with torch.no_grad():
        split(0)
        torch.distributed.barrier()
        if ctx.is_root:
            one_device(0)
            out["one_device_ms_before"] = _median_ms(one_device, num_layers, max(3, repeats // 2))
        torch.distributed.barrier()
        out["split_ms"] = _median_ms(split, num_layers, repeats)  # every rank at once, as in a request
        torch.distributed.barrier()
        if ctx.is_root:
            out["one_device_ms_after"] = _median_ms(one_device, num_layers, max(3, repeats // 2))
    mine = torch.tensor([out["split_ms"]], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
    torch.distributed.all_gather(every, mine)  # tensors only: nothing is unpickled (tests/test_security.py)
    if not ctx.is_root:
        return None
    return [out] + [{"rank": q, "split_ms": float(every[q])} for q in range(1, ctx.world_size)]


__all__ = ["colocated_rank", "inprocess_ratio", "layer_steps"]
