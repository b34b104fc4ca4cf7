"""The engine: one per rank. Rank 0 takes requests, plans each one, and drives the other ranks.

    with launch_local(2, "vit-tiny-test", profile) as engine:   # edgeprism.runtime.cluster; this process is rank 0
        result = engine.infer(batch)                                    # Result(outputs, metrics)

or, under any launcher, `Engine.from_profile(model, profile)` on every rank, then `infer` on rank 0
and `serve_workers()` on the others.

Per request on rank 0: check the input at the edge → `choose_plan(profile, request, live link
estimate with the healthy ranks, objective, limits)` →
- local: rank 0 runs the reference model; nothing is sent, the workers stay waiting;
- distributed: the request's one header, sealed JSON `{"op": "infer", ..., "plan", "split"}`, to the plan's
  workers (edgeprism.runtime.control): the plan with its token ranges, and `PositionWise.split`'s ranges,
  codec and raw parts' shapes; the plan's ranks run `PositionWise.forward` with it on their lane (no
  second header; rank 0 scatters raw input slices and gathers the outputs). After the outputs are in,
  the plan's ranks all-gather a few numbers per rank (bytes, staging, collective, per-layer link
  seconds): they fill the metrics row and feed the online link estimate.

Failures (docs/RELIABILITY.md). Every rank of a distributed request gives up on it after
`max(min_stall_s, stall_factor × predicted latency)`; a dead peer usually fails it at once. Rank 0 then
reruns the request locally (the same weights: the exact answer), marks the row with `fallback`, ends
the epoch (its lanes), and asks every worker to answer a ping within `regroup_timeout_s`; until the
round ends requests are planned local, and the next epoch's lanes are built over the workers that
answered. A worker that comes back, or a restarted process, joins again through the store and is
taken into a new epoch between two requests, without restarting rank 0.
Metrics rows carry predicted vs measured latency and energy (with its source), bytes and the
staging / collective / compute split; a request slower than `blow_factor` × its prediction is logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from edgeprism.comm.auth import load_secret
from edgeprism.comm.context import DistContext
from edgeprism.comm.exchange import PeerError
from edgeprism.comm.sealing import lanes_sealed
from edgeprism.models.base import Inputs, ReferenceModel
from edgeprism.partition.scatter import scatter_ratio
from edgeprism.partition.transform import PositionWise
from edgeprism.plan import Limits, Plan, Request, choose_plan
from edgeprism.plan.micro import with_micro_batches
from edgeprism.profile.schema import Profile
from edgeprism.runtime.compute_estimate import ComputeSpeedEstimator
from edgeprism.runtime.config import EngineConfig
from edgeprism.runtime.control import ControlChannel, Mailbox
from edgeprism.runtime.groups import default_store, retire_lanes, start_digests, start_recording
from edgeprism.runtime.joining import describe_self, join_cluster
from edgeprism.runtime.link_estimate import ComputeBiasEstimator, OnlineLinkEstimator
from edgeprism.runtime.membership import Membership
from edgeprism.runtime.metrics import MetricsRow, Result
from edgeprism.runtime.rank0_side import Rank0Side, as_local_plan
from edgeprism.runtime.requests import check_inputs
from edgeprism.runtime.stall_reports import PendingStall
from edgeprism.runtime.telemetry import RankTelemetry, observations, sync, telemetry
from edgeprism.runtime.worker_side import WorkerSide

log = logging.getLogger(__name__)

_FROM_ENV = object()


class Want(NamedTuple):
    """What a request asks for beyond the model's outputs."""

    gather_hidden: bool
    generate: int
    """Greedy tokens to decode after the prefill (0: none)."""


class Engine(Rank0Side, WorkerSide):
    """Serves requests per plan over the ranks of `ctx` (see the module docstring). Collective to build:
    every rank constructs one with the same model, weights and profile. `store` is the rendezvous store
    (default: the launcher's), `secret` the cluster secret (default: EDGEPRISM_SECRET_FILE /
    EDGEPRISM_SECRET), `bind_addr` the address the data lanes listen on (default: as torch picks).
    `session`: a worker already admitted by rank 0 (a device that joined a coordinator and was given its
    rank); `self_info`: what this process says of itself (host, device, cores) in the cluster status;
    `on_close`: what the launcher started for this engine (worker processes, the store), stopped by
    `close()` after the workers were told to stop; `boot_nonce`: rank 0's nonce when the launcher made
    it (a coordinator seals its published spec with it before the engine starts admitting)."""

    def __init__(self, model: ReferenceModel, profile: Profile, ctx: DistContext,
                 config: EngineConfig = EngineConfig(), meter=None, owns_ctx: bool = False, store=None,
                 secret=_FROM_ENV, bind_addr: str | None = None, session=None, self_info: dict | None = None,
                 on_close=None, boot_nonce: bytes | None = None) -> None:
        self.model = model.to(ctx.device).eval()
        self.profile = profile
        self.ctx = ctx
        self.config = config
        self.meter = meter
        self._owns_ctx = owns_ctx
        self.on_close = on_close
        self.self_info = dict(self_info or {})
        self.workers = None
        """The local worker processes its launcher started (edgeprism.runtime.cluster.LocalCluster), if any."""
        self.address: str | None = None
        """HOST:PORT of the store devices join, when this rank 0 serves one."""
        self._closed = False
        self._lock = threading.Lock()
        self._requests = 0
        self._local_streak = 0
        self._seen_plans: set = set()
        self.history: deque[MetricsRow] = deque(maxlen=config.history)
        self.estimator = OnlineLinkEstimator.from_profile(profile)
        self.compute_bias = ComputeBiasEstimator()
        self.speed_estimator = ComputeSpeedEstimator(ctx.world_size)
        self._stalled: PendingStall | None = None  # a failed request, until its stall reports are in
        self._dtype = next(self.model.parameters()).dtype
        self._lanes: dict = {}
        self._epoch = 0
        self._members: tuple[int, ...] = (0,)
        self._bind_addr = bind_addr
        self._control = self._membership = self._mailbox = None
        self.failures = 0
        """Distributed requests and probes that failed (and were answered locally)."""
        self.tampered = 0  # failed requests whose lane message did not open (its sender was dropped)
        self.sealed = False  # whether the lanes are sealed (rank 0 decides, per config.seal_lanes)
        profile.check(self.model.config, ctx.world_size, where="profile")
        if ctx.world_size == 1:
            log.info("engine ready on %s: %s (one rank)", ctx, profile)
            return
        self._store = store if store is not None else default_store(ctx)
        secret = load_secret() if secret is _FROM_ENV else secret
        self._secret = secret
        if secret is None:
            log.warning("no cluster secret (EDGEPRISM_SECRET_FILE): any process that reaches the store can join "
                        "this cluster; edgeprism serve / launch_local make one for you")
        digests = start_digests(self.model, profile)
        if ctx.is_root:
            self.sealed = lanes_sealed(config.seal_lanes, secret is not None, bind_addr)
            self._control = ControlChannel(self._store, ctx.link)
            self._membership = Membership(self._store, secret, ctx.world_size, digests, self._control, boot_nonce,
                                          devices=profile.devices)
            self._next_join_check = time.monotonic() + config.join_check_s
            if config.wait_for_workers:
                self._membership.wait_for_all(config.start_timeout_s)
                self._form_epoch()
                if len(self._members) < ctx.world_size:
                    raise RuntimeError(f"only ranks {list(self._members)} of {ctx.world_size} connected at start")
            elif self._membership.admit_waiting():
                self._form_epoch()
        else:
            if session is None:
                session = join_cluster(self._store, secret, ctx.group_rank, digests, config.start_timeout_s)
            if session.rank != ctx.group_rank:
                raise ValueError(f"admitted as rank {session.rank}, but the context is rank {ctx.group_rank}")
            describe_self(self._store, session, self.self_info)
            self._mailbox = Mailbox(self._store, session)
            self._serve(until_epoch=True)
        log.info("engine ready on %s: %s, epoch %d, %d lanes", ctx, profile, self._epoch, len(self._lanes))

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

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def link_estimate(self):
        """What the planner is given for the next request: the live link estimate with the live compute and
        device-speed corrections, sealing, and how this engine hides the exchange (overlap, micro-batches), so
        that a plan made outside (a benchmark's static strategy) is costed as the engine's own are."""
        return with_micro_batches(replace(
            self.estimator.estimate(), local_compute_scale=self.compute_bias.local_compute_scale, sealed=self.sealed,
            device_speed_scale=self.speed_estimator.scales(), overlap=self.config.overlap), self.config.micro_batches)

    @property
    def healthy_ranks(self) -> tuple[int, ...]:
        """Rank 0 and the workers the current epoch's lanes connect (rank 0 only)."""
        return self._members

    # --- rank 0 ---
    def plan_for(self, inputs: Inputs, objective: str | None = None, limits: Limits | None = None) -> Plan:
        """Check `inputs` at the edge and return the plan `infer` would run now (nothing is sent)."""
        inputs, num_tokens = self._checked(inputs)
        return self._plan(inputs, num_tokens, objective, limits)[0]

    def generate(self, inputs: Inputs, max_new_tokens: int, objective: str | None = None,
                 limits: Limits | None = None, request_id: str | None = None) -> Result:
        """Greedy decoding (decoder models, rank 0 only): the prompt's prefill is planned like any request
        (local, or split by position with the plan's codec); then the plan's last rank decodes from its
        cache with no further exchange. outputs["tokens"]: (B, max_new_tokens) int64. The plan's
        prediction covers the prefill only."""
        return self.infer(inputs, objective, limits, request_id, generate=max_new_tokens)

    def infer(self, inputs: Inputs, objective: str | None = None, limits: Limits | None = None,
              request_id: str | None = None, gather_hidden: bool = False, plan: Plan | None = None,
              generate: int = 0) -> Result:
        """Run one request (rank 0 only). ValueError for a bad request; the engine serves the next one.
        `gather_hidden` also returns every token's final hidden state as outputs["hidden"] (B, T, d).
        `generate` > 0: greedy decoding of that many tokens after the prefill (see `generate`).
        `plan` forces a plan (static baselines, e.g. from `plan.static_plan`) instead of planning; a
        forced plan over ranks that are not healthy runs locally."""
        if not self.ctx.is_root:
            raise RuntimeError("infer is for rank 0; the other ranks call serve_workers()")
        if self._closed:
            raise RuntimeError("the engine is closed")
        with self._lock:
            self._requests += 1
            request_id = str(request_id) if request_id is not None else str(self._requests)
            inputs, num_tokens = self._checked(inputs)  # the one check of this request
            want = Want(gather_hidden, self._checked_generate(num_tokens, generate))
            self.maintain()
            every = self.config.probe_every if self.config.learn_link else 0
            if self._local_streak and every and self._local_streak % every == 0:
                self._probe()
            forced = plan
            plan, request, link = self._plan(inputs, num_tokens, objective, limits, forced)
            if plan.mode == "distributed" and tuple(plan.ranks) not in self._lanes:
                log.warning("plan over ranks %s has no process group (healthy: %s); running locally",
                            list(plan.ranks), list(self._members))
                plan = as_local_plan(plan, request)
            if self.meter is not None:
                self.meter.begin_window(request_id)
            if plan.mode == "local":
                self._local_streak += 1
                outputs, row = self._run_local(inputs, plan, request, link, request_id, want)
                self._learn_speeds(plan, request, ())
            else:
                self._local_streak = 0
                start = time.perf_counter()
                try:
                    outputs, row = self._run_distributed(inputs, plan, request, link, request_id, want)
                except PeerError as err:
                    outputs, row = self._fall_back(err, inputs, plan, request, link, request_id, want,
                                                   time.perf_counter() - start)
            shape = (plan.mode, tuple(plan.ranks), plan.codec)
            warm = shape in self._seen_plans  # the first request of a plan shape also pays one-off set-up
            if warm and not row.fallback and self.config.learn_compute:
                self._learn_compute(plan, request, row)
            self._seen_plans.add(shape)
            if row.blew_prediction and not row.fallback:
                (log.warning if warm else log.info)(
                    "request %s took %.1f ms, over %.1f x its prediction of %.1f ms (%s; %s)", request_id,
                    row.latency_s * 1e3, self.config.blow_factor, row.predicted_latency_s * 1e3, plan, self.estimator)
            self.history.append(row)
            log.info("%s", row)
            return Result(request_id, outputs, row)

    def _checked(self, inputs: Inputs) -> tuple[Inputs, int]:
        """The request's inputs on this rank's device and dtype, and its token count: the one input check on
        the request's way (the plan, the local model and the split all take the count from here)."""
        check_inputs(inputs, self.config.max_batch)
        inputs = {k: (v.to(self._dtype) if v.is_floating_point() else v).to(self.ctx.device) for k, v in inputs.items()}
        return inputs, self.model.validate_input(inputs)

    def request_of(self, inputs: Inputs, num_tokens: int) -> Request:
        """The planner's view of checked `inputs` of `num_tokens` tokens per row: rows, tokens, and the bytes per
        token its scatter sends (8-bit pixels travel as levels, partition/scatter.py; else the profile's)."""
        batch = next(iter(inputs.values())).shape[0]
        ratio = scatter_ratio(self.model, inputs, num_tokens) if self.ctx.world_size > 1 else None
        return Request(self.model.config.name, batch, num_tokens,
                       None if ratio is None else ratio * self.profile.input_bytes_per_token)

    def _plan(self, inputs: Inputs, num_tokens: int, objective: str | None, limits: Limits | None,
              forced: Plan | None = None):
        request = self.request_of(inputs, num_tokens)
        link = self.link_estimate
        if len(self._members) < self.ctx.world_size:
            link = replace(link, healthy_ranks=self._members)
        if forced is not None:
            if sum(forced.token_counts) != num_tokens:
                raise ValueError(f"the forced plan splits {sum(forced.token_counts)} tokens as "
                                 f"{list(forced.token_counts)}; this request has {num_tokens}: make the plan for it")
            return forced, request, link
        if limits is None:
            limits = self.config.limits
        else:  # the engine's opt-in holds for a request's own budget; its codec list narrows the request's
            engine_codecs = self.config.limits.codecs
            codecs = limits.codecs if engine_codecs is None else tuple(
                c for c in (limits.codecs if limits.codecs is not None else engine_codecs) if c in engine_codecs)
            limits = replace(limits, allow_unmeasured_codecs=limits.allow_unmeasured_codecs
                             or self.config.allow_unmeasured_codecs, codecs=codecs)
        plan = choose_plan(self.profile, request, link, objective or self.config.objective, limits)
        return plan, request, link

    def _checked_generate(self, num_tokens: int, generate: int) -> int:
        if generate == 0:
            return 0
        if not self.model.causal:
            raise ValueError(f"{self.model.config.name} is an encoder: it answers embeddings, not generated tokens")
        limit = self.model.config.max_positions
        if not 1 <= generate <= limit - num_tokens:
            raise ValueError(f"{num_tokens} prompt tokens + {generate} new tokens must fit in "
                             f"{self.model.config.name}'s {limit} positions (and at least 1 new token)")
        return generate

    def _run_local(self, inputs, plan, request, link, request_id, want: Want, fallback: str = "",
                   spent_s: float = 0.0):
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.no_grad():
            if want.generate:  # one rank, the same cached decode as a split prefill's last rank
                one = DistContext(group_rank=0, world_size=1, backend="gloo", device=self.ctx.device,
                                  timeout_s=self.ctx.timeout_s)
                alone = PositionWise(self.model, one)
                split, parts = alone.split(inputs, plan.token_ranges, generate=want.generate)  # [(0, T)]
                outputs = {"tokens": alone.generate(inputs, want.generate, header=split, parts=parts)}
            else:
                outputs = self.model(inputs, num_tokens=request.num_tokens)
        sync(self.ctx.device)
        latency_s = time.perf_counter() - start + spent_s
        if not want.gather_hidden:
            outputs.pop("hidden", None)
        energy_j, source = self._energy(request_id, [(latency_s, 0.0, 0.0)])
        row = self._row(request_id, plan, request, link, latency_s, energy_j, source, 0, 0, 0.0, 0.0, 0.0, fallback,
                        cpu_s=time.process_time() - cpu_start)
        return outputs, row

    def _run_distributed(self, inputs, plan, request, link, request_id, want: Want):
        lane = self._lanes[tuple(plan.ranks)]
        transform = self._split_of(lane, plan.codec, plan.micro_batches)
        # The plan's ranges (the counts the cost model costed) and the request's one header: the workers
        # get everything the split needs in the control message below; nothing is broadcast again.
        split, parts = transform.split(inputs, plan.token_ranges, want.gather_hidden, want.generate)
        stall_s = self.config.stall_s(plan.predicted_latency_s)
        control = start_recording(self._control)
        stats = start_recording(lane.exchanger)
        header = {"op": "infer", "request_id": request_id, "epoch": self._epoch, "plan": plan.to_dict(),
                  "stall_s": stall_s, "split": split}
        start, cpu_start = time.perf_counter(), time.process_time()
        lane.exchanger.deadline = time.monotonic() + stall_s
        try:
            self._control.broadcast_json(header, ranks=plan.ranks[1:])
            try:
                if want.generate:
                    outputs = {"tokens": transform.generate(inputs, want.generate, header=split, parts=parts)}
                else:
                    outputs = transform.forward(inputs, header=split, parts=parts)
            except ValueError as err:  # the workers are mid-request: this is no longer one bad request
                raise RuntimeError(f"request {request_id} failed after the workers started it: {err}") from err
            sync(self.ctx.device)
            latency_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
            try:
                per_rank = telemetry(lane.exchanger, stats, latency_s, self.model.config.num_layers)
            except PeerError as err:  # the answer is in: keep it, but this epoch is over
                self._end_epoch(f"telemetry of request {request_id} failed: {err}", stall_s)
                per_rank = [RankTelemetry.of(stats, latency_s)]
        finally:
            lane.exchanger.deadline = None
        if len(per_rank) == len(plan.ranks) and self.config.learn_link:
            self.estimator.update(observations(per_rank, len(plan.ranks), len(per_rank[0].layers), self.model.causal))
        if (plan.mode, tuple(plan.ranks), plan.codec) in self._seen_plans:  # a first request pays set-up
            self._learn_speeds(plan, request, per_rank, decoded=bool(want.generate))
        rank0 = per_rank[0]
        bytes_exchanged = int(sum(r.nbytes_sent for r in per_rank)) + control.nbytes_sent
        layer_nbytes = int(sum(r.layer_nbytes for r in per_rank))
        phases = [(r.compute_s, r.staging_s, r.collective_s + r.emulated_delay_s) for r in per_rank]
        energy_j, source = self._energy(request_id, phases)
        row = self._row(request_id, plan, request, link, latency_s, energy_j, source, bytes_exchanged, layer_nbytes,
                        rank0.staging_s, rank0.collective_s + control.collective_s,
                        rank0.emulated_delay_s + control.emulated_delay_s, timeline=transform.timeline.to_rows(),
                        cpu_s=cpu_s)
        return outputs, row

    def close(self) -> None:
        """Rank 0: tell the workers to stop, stop a local cluster, leave the process group if ours."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.ctx.is_root and self._control is not None:
                self._control.broadcast_json({"op": "shutdown"})
        finally:
            retire_lanes(self._lanes, background=False)
            if self.on_close is not None:
                self.on_close()
            if self._owns_ctx:
                from edgeprism.comm.context import shutdown

                shutdown(self.ctx)


__all__ = ["Engine", "EngineConfig", "default_store"]
