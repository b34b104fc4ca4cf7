"""The benchmark's rank functions (`edgeprism.comm.job`): rank 0 drives, the others follow.

`bench_rank` runs one `JobSpec` (`bench.runner` starts it on every testbed host); each timed request
is one JSON row, reported by rank 0 as a progress line. `check_peers_rank` runs the peers once per model
and returns their largest difference from the local model.

Every strategy runs in this one job, on the same ranks, cores and link, interleaved request by request:
for each batch, each repeat serves the request once per strategy, in an order drawn for that repeat
(`bench.order.round_order`). Rank 0 tells the others what comes next over a dedicated long-timeout control group:
`{"op": "engine"}` (serve edgeprism's engine until it releases them), `{"op": "pipeline"}`,
`{"op": "tensor_parallel"}`, `{"op": "done"}`. `transformers` runs on rank 0 alone.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from edgeprism.bench.limits import limit_fields, plan_label
from edgeprism.bench.order import round_order
from edgeprism.bench.peers import head_row, input_layout
from edgeprism.bench.pipeline import PipelinePeer
from edgeprism.bench.scenarios import JobSpec
from edgeprism.bench.tensor_parallel import TensorParallelPeer
from edgeprism.bench.transformers_twin import transformers_forward, transformers_twin
from edgeprism.comm.context import DistContext
from edgeprism.comm.exchange import Exchanger
from edgeprism.comm.job import Progress
from edgeprism.models.loading import build_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.plan import choose_plan, static_plan
from edgeprism.runtime.engine import Engine, EngineConfig
from edgeprism.runtime.groups import make_control

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 6 * 3600.0


class _Followers:
    """Rank 0's side of the control protocol: where the other ranks are waiting right now."""

    def __init__(self, control, engine) -> None:
        self.control = control
        self.engine = engine
        self.in_engine = False

    def engine_step(self) -> None:
        if not self.in_engine:
            self.control.broadcast_json({"op": "engine"})
            self.in_engine = True

    def peer_step(self, message: dict) -> None:
        self.release_engine()
        self.control.broadcast_json(message)

    def release_engine(self) -> None:
        # `release` returns the workers from serve_workers() with the engine's lanes kept (a `shutdown`
        # would close them: the next engine request would then fail and be rerun locally).
        if self.in_engine:
            self.engine.release_workers()
            self.in_engine = False

    def finish(self) -> None:
        self.engine_step()
        self.engine.close()  # its shutdown returns the workers from serve_workers for the last time
        self.in_engine = False
        self.control.broadcast_json({"op": "done"})


def _answer_row(model, outputs: dict) -> torch.Tensor | None:
    for key in ("row", "cls", "last"):
        if key in outputs:
            return outputs[key]
    return None


def _wire_lower_bound_s(strategy: str, job, config, batch: int, num_tokens: int, rate_bps: float) -> float:
    """Seconds the busiest device's uplink needs for a peer's traffic alone (no compute, no delay)."""
    if rate_bps <= 0:
        return 0.0
    world, activation = job.world_size, batch * num_tokens * config.hidden_size * 4
    if strategy == "tensor_parallel":
        return 2 * config.num_layers * 2 * (world - 1) / world * activation * 8 / rate_bps
    if strategy == "pipeline":
        return activation * 8 / rate_bps
    return 0.0


def drive(spec, engine, peers: dict, hf, control, emit: Progress) -> None:
    """Rank 0: every batch, every repeat, every strategy; `emit` gets one JSON row per timed request."""
    job, model, profile = spec.job, engine.model, engine.profile
    config = model.config
    followers = _Followers(control, engine)
    energy = profile.energy
    for batch in job.batches:
        inputs = synthetic_inputs(config, batch, seq_len=job.model.seq_len, seed=job.seed + batch)
        num_tokens = model.validate_input(inputs)
        request = engine.request_of(inputs, num_tokens)
        with torch.no_grad():
            reference = head_row(model, model(inputs)["hidden"])  # untimed: for max_abs_diff_vs_local
        strategies = list(job.strategies)
        skipped = {s: _wire_lower_bound_s(s, job, config, batch, num_tokens, spec.link_rate_bps)
                   for s in strategies}
        for strategy in strategies:
            plan = _static(strategy, profile, request, engine)
            if plan is not None and plan.predicted_latency_s > job.skip_slower_than_s:
                skipped[strategy] = plan.predicted_latency_s
        unsupported_here = {s for s in strategies
                            if (s in peers and peers[s] is None) or (s == "transformers" and hf is None)}
        skipped = {s: v for s, v in skipped.items() if v > job.skip_slower_than_s or s in unsupported_here}
        for strategy in skipped:
            unsupported = strategy in unsupported_here
            emit(json.dumps({**spec.facts, **_point(job, batch, num_tokens), "strategy": strategy,
                             "repeat": None, "skipped": True, "latency_s": None,
                             "latency_lower_bound_s": None if unsupported else skipped[strategy],
                             "energy_j": None,
                             "reason": "unsupported here (model, world size or missing package)"
                             if unsupported
                             else f"wire time alone > skip_slower_than_s = {job.skip_slower_than_s} s"}))
        active = [s for s in strategies if s not in skipped]
        for repeat in range(-job.warmup, job.repeats):
            for strategy in round_order(active, repeat):  # a new order per round (bench/order.py)
                row = _serve(strategy, inputs, request, batch, engine, peers, hf, followers, energy)
                if repeat < 0:
                    continue  # warm-up
                answer = row.pop("answer")
                row["max_abs_diff_vs_local"] = (float((answer - reference).abs().max())
                                                if answer is not None else None)
                full = {**spec.facts, **_point(job, batch, num_tokens), "strategy": strategy, "repeat": repeat,
                        "skipped": False, **row, "time_s": time.time()}
                emit(json.dumps(full))
    followers.finish()


def _point(job, batch: int, num_tokens: int) -> dict:
    return {"scenario": job.scenario, "model": job.model.name, "model_case": job.model.label,
            "seq_len": job.model.seq_len, "num_tokens": num_tokens, "link": job.link, "world_size": job.world_size,
            "batch": batch, "interleaving": "request", "device_speeds": list(job.speeds)}


def _static(strategy: str, profile, request, engine):
    if strategy == "local":
        return static_plan(profile, request, engine.link_estimate, "local")
    if strategy == "full_exchange":
        return static_plan(profile, request, engine.link_estimate, "distributed", "fp32")
    if strategy.startswith("segment_means:"):
        return static_plan(profile, request, engine.link_estimate, "distributed", strategy.split(":", 1)[1])
    if strategy == "equal_split":  # the adaptive plan's codec (or sm16) over every device, equal shares
        adaptive = choose_plan(profile, request, engine.link_estimate)
        world = profile.world_size
        counts = tuple(request.num_tokens // world + (r < request.num_tokens % world) for r in range(world))
        return static_plan(profile, request, engine.link_estimate, "distributed",
                           adaptive.codec if adaptive.mode == "distributed" else "sm16", tuple(range(world)),
                           token_counts=counts)
    return None


def _serve(strategy, inputs, request, batch, engine, peers, hf, followers, energy) -> dict:
    """One timed request of `strategy`; the row's measured fields plus `answer` (the answer row)."""
    if strategy == "transformers":
        start = time.perf_counter()
        hidden = transformers_forward(hf, inputs)
        latency_s = time.perf_counter() - start
        return {"latency_s": latency_s, "energy_j": energy.compute_w * latency_s, "energy_source": "modelled",
                "mode": "local", "plan": "transformers (1 device)", "codec": "", "bytes_exchanged": 0,
                "fidelity_loss": 0.0,
                "predicted_latency_s": None, "answer": hidden[:, -1] if engine.model.causal else hidden[:, 0]}
    if strategy in ("pipeline", "tensor_parallel"):
        peer = peers[strategy]
        if strategy == "pipeline":
            followers.peer_step({"op": "pipeline", "batch": batch})
            run = peer.run(inputs, batch)
            plan = f"pipeline x{engine.ctx.world_size} ({len(peer.layers)} stages)"
        else:
            layout = input_layout(inputs)
            followers.peer_step({"op": "tensor_parallel", "layout": layout})
            run = peer.run(inputs, layout)
            plan = f"tensor parallel x{engine.ctx.world_size}"
        return {"latency_s": run.latency_s, "energy_j": run.energy_j(energy.compute_w, energy.network_w),
                "energy_source": "modelled", "mode": "distributed", "plan": plan, "codec": "", "fidelity_loss": 0.0,
                "bytes_exchanged": run.bytes_exchanged, "predicted_latency_s": None,
                "per_rank_wall_compute_link_bytes": [list(r) for r in run.per_rank], "answer": run.outputs["row"]}
    followers.engine_step()
    plan = _static(strategy, engine.profile, request, engine)
    start = time.perf_counter()
    result = engine.infer(inputs, plan=plan)  # the user-visible call: checks, planning, serving, telemetry
    latency_s = time.perf_counter() - start
    m = result.metrics
    label = plan_label(m.plan)
    return {"latency_s": latency_s, "engine_latency_s": m.latency_s, "energy_j": m.energy_j,
            "energy_source": m.energy_source, "mode": m.mode,
            "plan": label, "codec": m.plan.get("codec") or "", "bytes_exchanged": m.bytes_exchanged,
            "fidelity_loss": m.fidelity_loss,
            "predicted_latency_s": m.predicted_latency_s, "staging_s": m.staging_s, "collective_s": m.collective_s,
            "compute_s": m.compute_s, "fallback": getattr(m, "fallback", ""), "timeline": m.timeline,
            **limit_fields(engine.profile, request, m.plan, engine.link_estimate, latency_s),
            "answer": _answer_row(engine.model, result.outputs)}


def follow(ctx, engine, peers: dict, control) -> None:
    """Ranks other than 0: do what rank 0 says next, until done."""
    while True:
        message = control.broadcast_json(None)
        op = message.get("op")
        if op == "done":
            return
        if op == "engine":
            engine.serve_workers()
        elif op == "pipeline":
            peers["pipeline"].run(None, int(message["batch"]))
        elif op == "tensor_parallel":
            peers["tensor_parallel"].run(None, message["layout"])
        else:
            raise RuntimeError(f"unknown bench control op {op!r} from rank 0")


def _build_peers(model, ctx, strategies) -> dict:
    """Peers for the job; None where the model cannot run that way here (same answer on every rank)."""
    peers: dict = {}
    for name, make in (("pipeline", PipelinePeer), ("tensor_parallel", TensorParallelPeer)):
        if name in strategies:
            try:
                peers[name] = make(model, ctx)
            except ValueError as err:
                log.warning("%s peer unavailable: %s", name, err)
                peers[name] = None
    return peers


def bench_rank(ctx: DistContext, args: dict[str, Any], progress: Progress) -> None:
    """Rank function (`edgeprism.comm.job`): one benchmark job; `args` is a JobSpec as a dict. Rank 0
    reports each row as a progress line."""
    spec = JobSpec.from_dict(args)
    job = spec.job
    config = EngineConfig(max_batch=max(job.batches), probe_every=0, max_fidelity_loss=job.max_fidelity_loss,
                          allow_unmeasured_codecs=job.allow_unmeasured_codecs, codecs=job.adaptive_codecs)
    engine = Engine.from_profile(job.model.name, spec.profile, seed=job.seed, ctx=ctx, config=config)
    peers = _build_peers(engine.model, ctx, job.strategies)
    control = make_control(ctx, CONTROL_TIMEOUT_S)
    if ctx.is_root:
        hf = None
        if "transformers" in job.strategies:
            try:
                import transformers
            except ImportError:
                log.warning("strategy transformers not run: transformers is not installed "
                            "(pip install transformers)")
            else:
                transformers.logging.set_verbosity_error()
                transformers.utils.logging.disable_progress_bar()
                hf = transformers_twin(engine.model)
        drive(spec, engine, peers, hf, control, progress)
    else:
        follow(ctx, engine, peers, control)


def check_peers_rank(ctx: DistContext, args: dict[str, Any], progress: Progress) -> dict[str, float] | None:
    """Rank function (`edgeprism.comm.job`): run the pipeline and tensor-parallel peers on each model of
    `args["models"]` (batch `args["batch"]`, default 8); rank 0 returns their largest absolute difference
    from the local model's answer row (and its head outputs), per "model/peer"."""
    batch = int(args.get("batch", 8))
    results = {}
    for name in args["models"]:
        model = build_model(name, seed=0)
        peers = _build_peers(model, ctx, ("pipeline", "tensor_parallel"))
        inputs = synthetic_inputs(model.config, batch, seed=1) if ctx.is_root else None
        with torch.no_grad():
            reference = model(inputs) if ctx.is_root else None
        # JSON, not pickle, even between trusted local ranks (nothing is unpickled at run time)
        message = {"layout": input_layout(inputs)} if ctx.is_root else None
        layout = Exchanger(ctx).broadcast_json(message)["layout"]
        box = [[(key, shape, dtype) for key, shape, dtype in layout]]
        for peer_name, peer in peers.items():
            if peer is None:
                continue
            if peer_name == "pipeline":  # half the batch first: same micro-batch count, other shapes
                peer.run({k: v[:batch // 2] for k, v in inputs.items()} if inputs else None, batch // 2)
            run = peer.run(inputs, batch) if peer_name == "pipeline" else peer.run(inputs, box[0])
            if ctx.is_root:
                diffs = {"row": float((run.outputs["row"] - head_row(model, reference["hidden"])).abs().max())}
                for key in ("pooled", "logits_last"):
                    if key in run.outputs:
                        diffs[key] = float((run.outputs[key] - reference[key]).abs().max())
                results[f"{name}/{peer_name}"] = max(diffs.values())
    return results if ctx.is_root else None


__all__ = ["CONTROL_TIMEOUT_S", "bench_rank", "check_peers_rank", "drive", "follow"]
