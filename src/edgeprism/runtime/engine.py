"""The engine: one per rank. Rank 0 takes requests, plans each one, and drives the other ranks.

    with Engine.launch_local(2, "vit-tiny-test", profile) as engine:   # this process is rank 0
        result = engine.infer(batch)                                    # Result(outputs, metrics)

or, under any launcher, `Engine.from_profile(model, profile)` on every rank, then `infer` on rank 0
and `serve_workers()` on the others.

Per request on rank 0: check the input at the edge → `choose_plan(profile, request, live link
estimate, objective, limits)` →
- local: rank 0 runs the reference model; nothing is sent, the workers stay waiting;
- distributed: a bounded JSON header `{"op": "infer", "request_id", "plan"}` over the control group;
  the plan's ranks run `PositionWise.forward` on their lane (rank 0 scatters raw input slices and
  gathers the outputs); ranks outside the plan go back to waiting. After the outputs are in, the
  plan's ranks all-gather a few numbers per rank (bytes, staging, collective, per-layer link
  seconds): they fill the metrics row and feed the online link estimate.
Metrics rows carry predicted vs measured latency and energy (with its source), bytes and the
staging / collective / compute split; a request slower than `blow_factor` × its prediction is logged.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from edgeprism.comm.context import DistContext
from edgeprism.comm.exchange import Exchanger
from edgeprism.models.base import Inputs, ReferenceModel
from edgeprism.plan import Limits, Plan, Request, choose_plan
from edgeprism.profile.schema import Profile
from edgeprism.runtime.groups import make_control, make_lanes, start_recording, verify_same_start
from edgeprism.runtime.link_estimate import LinkObservation, OnlineLinkEstimator
from edgeprism.runtime.metrics import MetricsRow, Result
from edgeprism.runtime.requests import check_inputs

log = logging.getLogger(__name__)

_TELEMETRY_HEAD = 6  # wall_s, nbytes_sent, layer_nbytes, staging_s, collective_s, emulated_delay_s


@dataclass(frozen=True)
class EngineConfig:
    """How the engine plans and protects itself. Times in seconds."""

    objective: Literal["latency", "energy", "edp"] = "latency"
    max_fidelity_loss: float | None = None
    """Largest normalised metric loss a codec may have (None: any profiled codec)."""
    max_latency_s: float | None = None
    max_batch: int = 32
    """Requests with more rows are refused (ValueError for that request)."""
    size_aware: bool = False
    blow_factor: float = 2.0
    """A request whose latency exceeds this × its prediction is logged as a warning."""
    probe_every: int = 8
    """After this many local plans in a row, measure the link with a small probe (0: never), so that a
    link that got faster can win back distributed plans."""
    probe_nbytes: int = 64 * 1024
    idle_timeout_s: float = 7 * 24 * 3600.0
    """How long idle workers wait for the next control message."""
    history: int = 1000
    """Metrics rows kept in `Engine.history`."""

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch {self.max_batch} must be >= 1")
        if self.blow_factor <= 1:
            raise ValueError(f"blow_factor {self.blow_factor} must be > 1")
        if self.probe_every < 0 or self.probe_nbytes < 1:
            raise ValueError(f"probe_every {self.probe_every} must be >= 0 and probe_nbytes {self.probe_nbytes} >= 1")
        Limits(self.max_fidelity_loss, self.max_latency_s)  # validates both

    @property
    def limits(self) -> Limits:
        return Limits(self.max_fidelity_loss, self.max_latency_s)


class Engine:
    """Serves requests per plan over the ranks of `ctx` (see the module docstring). Collective to build:
    every rank constructs one with the same model, weights and profile."""

    def __init__(self, model: ReferenceModel, profile: Profile, ctx: DistContext,
                 config: EngineConfig = EngineConfig(), meter=None, owns_ctx: bool = False) -> None:
        self.model = model.to(ctx.device).eval()
        self.profile = profile
        self.ctx = ctx
        self.config = config
        self.meter = meter
        self._owns_ctx = owns_ctx
        self._cluster = None
        self._closed = False
        self._lock = threading.Lock()
        self._requests = 0
        self._local_streak = 0
        self._seen_plans: set = set()
        self.history: deque[MetricsRow] = deque(maxlen=config.history)
        self.estimator = OnlineLinkEstimator.from_profile(profile)
        # Collective from here on: every rank runs the same steps in the same order.
        verify_same_start(Exchanger(ctx), self.model, profile)
        profile.check(self.model.config, ctx.world_size, where="profile")  # identical on every rank now
        self._control = make_control(ctx, config.idle_timeout_s) if ctx.world_size > 1 else None
        self._lanes = make_lanes(ctx, profile) if ctx.world_size > 1 else {}
        self._dtype = next(self.model.parameters()).dtype
        log.info("engine ready on %s: %s, %d lanes", ctx, profile, len(self._lanes))

    # --- construction helpers ---
    @classmethod
    def from_profile(cls, model: str | ReferenceModel, profile: str | Path | Profile, checkpoint: str | None = None,
                     seed: int = 0, ctx: DistContext | None = None, config: EngineConfig = EngineConfig(),
                     meter=None) -> Engine:
        """Every rank: load the model and profile; join the launcher's process group when `ctx` is None."""
        from edgeprism.comm.context import init_distributed
        from edgeprism.models.loading import load_model

        if isinstance(model, str):
            model = load_model(model, checkpoint, seed=seed)
        if not isinstance(profile, Profile):
            profile = Profile.load(profile, expect_model=model.config)
        owns = ctx is None
        if ctx is None:
            ctx = init_distributed("gloo")
        return cls(model, profile, ctx, config, meter=meter, owns_ctx=owns)

    @classmethod
    def launch_local(cls, world_size: int, model: str, profile: str | Path | Profile, **kwargs) -> Engine:
        """This process becomes rank 0 and starts world_size - 1 pinned worker processes (see
        `edgeprism.runtime.cluster.launch_engine` for the options). Use as a context manager."""
        from edgeprism.runtime.cluster import launch_engine

        return launch_engine(world_size, model, profile, **kwargs)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def link_estimate(self):
        return self.estimator.estimate()

    # --- rank 0 ---
    def plan_for(self, inputs: Inputs, objective: str | None = None, limits: Limits | None = None) -> Plan:
        """Check `inputs` at the edge and return the plan `infer` would run now (nothing is sent)."""
        inputs = self._checked(inputs)
        return self._plan(inputs, objective, limits)[0]

    def infer(self, inputs: Inputs, objective: str | None = None, limits: Limits | None = None,
              request_id: str | None = None, gather_hidden: bool = False, plan: Plan | None = None) -> Result:
        """Run one request (rank 0 only). ValueError for a bad request; the engine serves the next one.
        `gather_hidden` also returns every token's final hidden state as outputs["hidden"] (B, T, d).
        `plan` forces a plan (static baselines, e.g. from `plan.static_plan`) instead of planning."""
        if not self.ctx.is_root:
            raise RuntimeError("infer is for rank 0; the other ranks call serve_workers()")
        if self._closed:
            raise RuntimeError("the engine is closed")
        with self._lock:
            self._requests += 1
            request_id = str(request_id) if request_id is not None else str(self._requests)
            inputs = self._checked(inputs)
            if self._local_streak and self.config.probe_every and self._local_streak % self.config.probe_every == 0:
                self._probe()
            forced = plan
            plan, request, link = self._plan(inputs, objective, limits, forced)
            if plan.mode == "distributed" and tuple(plan.ranks) not in self._lanes:
                log.warning("plan over ranks %s has no process group; running locally", list(plan.ranks))
                plan = replace(plan, mode="local", ranks=(0,), token_shares=(1.0,),
                               token_counts=(request.num_tokens,), codec="", cr=1, wire_dtype="")
            if self.meter is not None:
                self.meter.begin_window(request_id)
            if plan.mode == "local":
                self._local_streak += 1
                outputs, row = self._run_local(inputs, plan, request, link, request_id, gather_hidden)
            else:
                self._local_streak = 0
                outputs, row = self._run_distributed(inputs, plan, request, link, request_id, gather_hidden)
            shape = (plan.mode, tuple(plan.ranks), plan.codec)
            warm = shape in self._seen_plans  # the first request of a plan shape also pays one-off set-up
            self._seen_plans.add(shape)
            if row.blew_prediction:
                (log.warning if warm else log.info)(
                    "request %s took %.1f ms, over %.1f x its prediction of %.1f ms (%s; %s)", request_id,
                    row.latency_s * 1e3, self.config.blow_factor, row.predicted_latency_s * 1e3, plan, self.estimator)
            self.history.append(row)
            log.info("%s", row)
            return Result(request_id, outputs, row)

    def _checked(self, inputs: Inputs) -> Inputs:
        check_inputs(inputs, self.config.max_batch)
        inputs = {k: (v.to(self._dtype) if v.is_floating_point() else v).to(self.ctx.device) for k, v in inputs.items()}
        self.model.validate_input(inputs)
        return inputs

    def _plan(self, inputs: Inputs, objective: str | None, limits: Limits | None, forced: Plan | None = None):
        num_tokens = self.model.validate_input(inputs)
        batch = next(iter(inputs.values())).shape[0]
        request = Request(self.model.config.name, batch, num_tokens)
        link = self.estimator.estimate()
        if forced is not None:
            return forced, request, link
        plan = choose_plan(self.profile, request, link, objective or self.config.objective,
                           limits or self.config.limits)
        return plan, request, link

    def _run_local(self, inputs, plan, request, link, request_id, gather_hidden):
        start = time.perf_counter()
        with torch.no_grad():
            outputs = self.model(inputs)
        _sync(self.ctx.device)
        latency_s = time.perf_counter() - start
        if not gather_hidden:
            outputs.pop("hidden", None)
        energy_j, source = self._energy(request_id, [(latency_s, 0.0, 0.0, 0.0)])
        row = self._row(request_id, plan, request, link, latency_s, energy_j, source, 0, 0, 0.0, 0.0, 0.0)
        return outputs, row

    def _run_distributed(self, inputs, plan, request, link, request_id, gather_hidden):
        from edgeprism.partition.ranges import split_tokens

        lane = self._lanes[tuple(plan.ranks)]
        shares = tuple(c / request.num_tokens for c in plan.token_counts)
        ranges = split_tokens(request.num_tokens, shares)
        assert tuple(r.num_tokens for r in ranges) == tuple(plan.token_counts), (ranges, plan.token_counts)
        transform = lane.transform(self.model, plan.codec, self.config.size_aware)
        control = start_recording(self._control)
        stats = start_recording(lane.exchanger)
        header = {"op": "infer", "request_id": request_id, "plan": plan.to_dict(), "gather_hidden": gather_hidden}
        start = time.perf_counter()
        self._control.broadcast_json(header)
        try:
            outputs = transform.forward(inputs, shares, gather_hidden=gather_hidden)
            _sync(self.ctx.device)
            latency_s = time.perf_counter() - start
            per_rank = _telemetry(lane.exchanger, stats, latency_s, self.model.config.num_layers)
        except ValueError as err:  # the workers are mid-request: this is no longer one bad request
            raise RuntimeError(f"request {request_id} failed after the workers started it: {err}") from err
        self.estimator.update(_observations(per_rank, stats, len(plan.ranks), self.model.config.num_layers))
        rank0 = per_rank[0]
        bytes_exchanged = int(sum(r[1] for r in per_rank)) + control.nbytes_sent
        layer_nbytes = int(sum(r[2] for r in per_rank))
        phases = [(r[0], r[3], r[4] + r[5], 0.0) for r in per_rank]
        energy_j, source = self._energy(request_id, phases)
        row = self._row(request_id, plan, request, link, latency_s, energy_j, source, bytes_exchanged, layer_nbytes,
                        rank0[3], rank0[4] + control.collective_s, rank0[5] + control.emulated_delay_s)
        return outputs, row

    def _energy(self, request_id: str, phases: list[tuple[float, float, float, float]]) -> tuple[float, str]:
        """Measured energy of the plan's ranks. Modelled from each rank's (wall, staging, link) seconds with
        the profile's power model, exactly as the cost model charges them; with a meter, rank 0's part
        is metered instead (the others stay modelled, and the source says so)."""
        e = self.profile.energy
        modelled = [e.compute_w * max(0.0, wall - staging - net) + e.staging_w * staging + e.network_w * net
                    for wall, staging, net, _ in phases]
        if self.meter is None:
            return sum(modelled), "modelled"
        measurement = self.meter.end_window(request_id)
        if len(phases) == 1:
            return measurement.energy_j, measurement.source
        return measurement.energy_j + sum(modelled[1:]), f"{measurement.source} rank 0 + modelled others"

    def _row(self, request_id, plan, request, link, latency_s, energy_j, source, bytes_exchanged, layer_nbytes,
             staging_s, collective_s, delay_s) -> MetricsRow:
        return MetricsRow(
            request_id=request_id, plan=json.loads(plan.to_json()), mode=plan.mode, batch=request.batch,
            num_tokens=request.num_tokens, predicted_latency_s=plan.predicted_latency_s, latency_s=latency_s,
            predicted_energy_j=plan.predicted_energy_j, energy_j=energy_j, energy_source=source,
            bytes_exchanged=bytes_exchanged, layer_nbytes=layer_nbytes, staging_s=staging_s,
            collective_s=collective_s, compute_s=max(0.0, latency_s - staging_s - collective_s),
            emulated_delay_s=delay_s, link_bandwidth_bps=link.bandwidth_bps, link_latency_s=link.latency_s,
            blew_prediction=latency_s > self.config.blow_factor * plan.predicted_latency_s)

    def _probe(self) -> None:
        """Measure the link over the largest lane: a synchronising exchange, then a small and a large one."""
        if not self._lanes:
            return
        ranks = max(self._lanes, key=len)
        self._control.broadcast_json({"op": "probe", "ranks": list(ranks), "nbytes": self.config.probe_nbytes})
        stats = start_recording(self._lanes[ranks].exchanger)
        _probe_exchanges(self._lanes[ranks].exchanger, self.config.probe_nbytes)
        k = len(ranks)
        observations = [LinkObservation((k - 1) * sent, k - 1, seconds)
                        for kind, sent, seconds in stats.events if kind == "probe"]
        log.info("link probe over ranks %s: %s", list(ranks), self.estimator.update(observations))

    def close(self) -> None:
        """Rank 0: tell the workers to stop, stop a local cluster, leave the process group if ours."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.ctx.is_root and self._control is not None:
                self._control.broadcast_json({"op": "shutdown"})
        finally:
            if self._cluster is not None:
                self._cluster.stop()
            if self._owns_ctx:
                from edgeprism.comm.context import shutdown

                shutdown(self.ctx)

    # --- the other ranks ---
    def serve_workers(self) -> int:
        """Worker loop: wait for a header, run our part of the plan or nothing, until shutdown.
        Returns the number of distributed requests this rank took part in."""
        if self.ctx.is_root:
            raise RuntimeError("serve_workers is for ranks other than 0")
        if self._control is None:
            return 0
        served = 0
        while True:
            header = self._control.broadcast_json(None)
            op = header.get("op")
            if op == "shutdown":
                log.info("rank %d: shutdown after %d requests", self.ctx.group_rank, served)
                return served
            if op == "probe":
                lane = self._lanes[tuple(header["ranks"])]
                if lane.exchanger is not None:
                    _probe_exchanges(lane.exchanger, int(header["nbytes"]))
                continue
            if op != "infer":
                raise RuntimeError(f"unknown control op {op!r} from rank 0")
            plan = Plan.from_dict(header["plan"])
            lane = self._lanes[tuple(plan.ranks)]
            if lane.exchanger is None:
                continue  # not in this plan: straight back to waiting
            stats = start_recording(lane.exchanger)
            start = time.perf_counter()
            lane.transform(self.model, plan.codec, self.config.size_aware).forward(
                None, gather_hidden=bool(header.get("gather_hidden")))
            _sync(self.ctx.device)
            _telemetry(lane.exchanger, stats, time.perf_counter() - start, self.model.config.num_layers)
            served += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _probe_exchanges(exchanger, nbytes: int) -> None:
    world = exchanger.ctx.world_size
    for size, kind in ((8, "probe-sync"), (8, "probe"), (nbytes, "probe")):
        exchanger.all_gather_bytes(torch.zeros(size, dtype=torch.uint8), [size] * world, kind=kind)


def _telemetry(exchanger, stats, wall_s: float, num_layers: int) -> list[list[float]]:
    """All-gather each plan rank's numbers for the request just served (after it, so untimed):
    [wall_s, nbytes_sent, layer_nbytes, staging_s, collective_s, delay_s, (layer bytes, layer link s) x L]."""
    layer = [(sent, seconds) for kind, sent, seconds in stats.events if kind == "layer"][:num_layers]
    layer += [(0, 0.0)] * (num_layers - len(layer))
    values = [wall_s, float(stats.nbytes_sent), float(stats.per_kind_nbytes.get("layer", 0)), stats.staging_s,
              stats.collective_s, stats.emulated_delay_s] + [x for pair in layer for x in pair]
    mine = torch.tensor(values, dtype=torch.float64)
    payload = mine.view(torch.uint8)
    world = exchanger.ctx.world_size
    gathered = exchanger.all_gather_bytes(payload, [payload.numel()] * world, kind="telemetry")
    return [g.clone().view(torch.float64).tolist() for g in gathered]


def _observations(per_rank: list[list[float]], stats, k: int, num_layers: int) -> list[LinkObservation]:
    """Link observations of one request: each layer exchange, timed by the rank that waited least for it
    (the last to arrive waits only for the wire, not for slower peers' compute), and rank 0's sends."""
    out = []
    for i in range(num_layers):
        sent = max(r[_TELEMETRY_HEAD + 2 * i] for r in per_rank)
        seconds = min(r[_TELEMETRY_HEAD + 2 * i + 1] for r in per_rank)
        if sent > 0:
            out.append(LinkObservation((k - 1) * sent, k - 1, seconds))
    out += [LinkObservation(sent, 1, seconds) for kind, sent, seconds in stats.events if kind == "scatter"]
    return out


__all__ = ["Engine", "EngineConfig"]
