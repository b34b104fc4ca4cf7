"""One batch, run locally or position-wise over the ranks of a job.

`batch_rank` is the rank function of `edgeprism run` (`comm.launch.run_job`, local processes or
testbed hosts); it also runs under plain torchrun through the one process main:

    torchrun --nproc-per-node 2 -m edgeprism.comm.job edgeprism.runtime.batch:batch_rank \
        --args '{"model": "vit-tiny-test", ...}'

Rank 0 returns one result dict (the job's result).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from edgeprism.comm.context import DistContext
from edgeprism.comm.exchange import Exchanger
from edgeprism.compress.registry import get_codec, is_lossless
from edgeprism.models.gpt2 import greedy_generate
from edgeprism.models.loading import load_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.partition.ranges import equal_shares, split_tokens
from edgeprism.partition.scatter import scatter_ratio
from edgeprism.partition.transform import DEFAULT_SIZE_AWARE, PositionWise

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchSpec:
    """What to run. Everything a rank needs travels in this spec (no global state)."""

    model: str
    batch: int = 1
    world_size: int = 1
    mode: str = "distributed"  # "local" | "distributed"
    shares: tuple[float, ...] | None = None
    codec: str = "fp32"
    size_aware: bool = DEFAULT_SIZE_AWARE
    seq_len: int | None = None
    image_size: int | None = None
    padded: bool = False
    checkpoint: str | None = None
    seed: int = 0
    warmup: int = 1
    repeats: int = 3
    compare_local: bool = False
    backend: str = "auto"
    """Process-group backend the job is launched with (`run_job(dist_backend=...)`)."""
    device: str = "cpu"
    generate: int = 0
    """Decoder models: greedy tokens to generate after the (distributed) prefill; 0 = prefill only."""
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> BatchSpec:
        if data.get("shares") is not None:
            data = {**data, "shares": tuple(data["shares"])}
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> BatchSpec:
        return cls.from_dict(json.loads(text))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def _max_abs_diff(got: dict, expected: dict) -> tuple[float, dict[str, float]]:
    per_key = {k: float((got[k].float() - expected[k].float()).abs().max()) for k in got if k in expected}
    return (max(per_key.values()) if per_key else float("nan")), per_key


def _gather_stats(ctx: DistContext, exchanger: Exchanger, stats) -> list[list[float]]:
    """Per-rank [layer bytes sent, total bytes sent, staging_s, collective_s, emulated_delay_s] to every rank."""
    row = torch.tensor([float(stats.per_kind_nbytes.get("layer", 0)), float(stats.nbytes_sent), stats.staging_s,
                        stats.collective_s, stats.emulated_delay_s], dtype=torch.float64)
    if ctx.world_size == 1:
        return [row.tolist()]
    rows = [torch.zeros_like(row) for _ in range(ctx.world_size)]
    torch.distributed.all_gather(rows, row)
    return [r.tolist() for r in rows]


def run_batch(spec: BatchSpec, ctx: DistContext) -> dict | None:
    model = load_model(spec.model, spec.checkpoint, seed=spec.seed).to(ctx.device)
    inputs = None
    if ctx.is_root:
        inputs = synthetic_inputs(model.config, spec.batch, seq_len=spec.seq_len, image_size=spec.image_size,
                                  padded=spec.padded, seed=spec.seed + 1)
        inputs = {k: v.to(ctx.device) for k, v in inputs.items()}
    num_tokens = model.validate_input(inputs) if ctx.is_root else 0  # rank 0 alone holds the request
    latencies: list[float] = []
    timeline: list[dict] = []
    outputs = prefill = None
    if spec.mode == "local":
        if not ctx.is_root:
            return None
        for i in range(spec.warmup + spec.repeats):
            start = time.perf_counter()
            with torch.no_grad():
                outputs = greedy_generate(model, inputs, spec.generate) if spec.generate else model(inputs)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= spec.warmup:
                latencies.append(time.perf_counter() - start)
        stats_rows = [[0.0, 0.0, 0.0, 0.0, 0.0]]
        ranges = [[0, num_tokens]]
    else:
        engine = PositionWise(model, ctx, get_codec(spec.codec), size_aware=spec.size_aware)
        engine.verify_peers()
        for i in range(spec.warmup + spec.repeats):
            engine.exchanger.reset_stats()
            start = time.perf_counter()
            if spec.generate:
                outputs = engine.generate(inputs, spec.generate, spec.shares)
            else:
                outputs = engine.forward(inputs, spec.shares, gather_hidden=False)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= spec.warmup:
                latencies.append(time.perf_counter() - start)
        timeline = engine.timeline.to_rows()  # the last timed request's layers on this rank
        stats_rows = _gather_stats(ctx, engine.exchanger, engine.exchanger.stats)
        if spec.compare_local:  # untimed: gather every hidden state for a strict comparison (the prefill's too)
            prefill = engine.forward(inputs, spec.shares, gather_hidden=True)
        ranges = None
        if ctx.is_root:
            ranges = [[r.start, r.end] for r in split_tokens(num_tokens, spec.shares or equal_shares(ctx.world_size))]
    if not ctx.is_root:
        return None
    result = {
        "mode": spec.mode,
        "model": spec.model,
        "world_size": ctx.world_size,
        "batch": spec.batch,
        "num_tokens": num_tokens,
        "token_ranges": ranges,
        # wire over raw bytes of the scatter (8-bit pixels travel as levels; None: raw), for predictions to match
        "scatter_ratio": None if spec.mode == "local" else scatter_ratio(model, inputs, num_tokens),
        "codec": spec.codec if spec.mode != "local" else None,
        # No profile here: exact plans and lossless wires lose 0; any other codec, named by the user, is unmeasured.
        "fidelity_loss": 0.0 if spec.mode == "local" or is_lossless(spec.codec) else None,
        "timeline": timeline,
        "size_aware": spec.size_aware,
        "backend": ctx.backend,
        "device": str(ctx.device),
        "latency_s": statistics.median(latencies),
        "latencies_s": latencies,
        "bytes_exchanged": int(sum(r[0] for r in stats_rows)),
        "bytes_total_nbytes": int(sum(r[1] for r in stats_rows)),
        "staging_s": stats_rows[0][2] if spec.mode != "local" else 0.0,
        "collective_s": stats_rows[0][3] if spec.mode != "local" else 0.0,
        "emulated_delay_s": stats_rows[0][4] if spec.mode != "local" else 0.0,
        "per_rank": [
            {
                "group_rank": i,
                "layer_nbytes": int(r[0]),
                "total_nbytes": int(r[1]),
                "staging_s": r[2],
                "collective_s": r[3],
                "emulated_delay_s": r[4],
            }
            for i, r in enumerate(stats_rows)
        ],
        "cores": list(ctx.cores),
        "torch_threads": torch.get_num_threads(),
        "link": ctx.link.describe() if ctx.link is not None else "loopback (not shaped)",
    }
    result["compute_s"] = max(0.0, result["latency_s"] - result["staging_s"] - result["collective_s"]
                              - result["emulated_delay_s"])
    if spec.generate:
        result["generate"] = spec.generate
        result["generated_ids"] = outputs.tolist()
        if spec.compare_local:
            reference_ids = greedy_generate(model, inputs, spec.generate)
            result["generated_match_fraction"] = float((reference_ids == outputs).float().mean())
    if spec.compare_local and (prefill is not None or not spec.generate):
        with torch.no_grad():
            reference = model(inputs)
        compared = prefill if prefill is not None else outputs
        result["max_abs_diff"], result["max_abs_diff_per_output"] = _max_abs_diff(compared, reference)
    return result


def batch_rank(ctx: DistContext, args: dict, progress=None) -> dict | None:
    """Rank function (`edgeprism.comm.job`): `args` is a BatchSpec as a dict; rank 0 returns the result."""
    return run_batch(BatchSpec.from_dict(args), ctx)
