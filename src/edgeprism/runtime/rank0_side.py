"""The engine's duties on rank 0 besides running a request: take in devices that join, drop those that
leave or stop answering, build each epoch's lanes, say who is in the cluster; and the bookkeeping around
requests (energy, the metrics row, the online compute bias, link probes).

`Engine` inherits this (as it inherits `WorkerSide` for the other ranks); the state it uses (`ctx`,
`config`, `profile`, the control channel, membership, lanes, epoch and members) is the engine's own.
`infer` calls `maintain()` before every request; a serving coordinator also calls `tick()` while idle
(`edgeprism serve --listen` does, every `join_check_s`), so that a device that joins is in the next
epoch before the next request arrives.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

from edgeprism.comm.exchange import PeerError
from edgeprism.comm.sealing import TamperError
from edgeprism.plan import Plan, Request
from edgeprism.plan.cost import predict, rank_compute_s
from edgeprism.runtime.cluster_jobs import JobError, check_job, lane_job_context, run_job_here
from edgeprism.runtime.groups import LaneKeys, build_epoch_lanes, retire_lanes, start_recording
from edgeprism.runtime.joining import admission_key
from edgeprism.runtime.link_estimate import LinkObservation
from edgeprism.runtime.metrics import MetricsRow
from edgeprism.runtime.stall_reports import PendingStall, progress_of, read_stall_reports
from edgeprism.runtime.tamper import read_reports
from edgeprism.runtime.telemetry import probe_exchanges

log = logging.getLogger("edgeprism.runtime.engine")  # one logger for every side of the engine

STALL_WAIT = 3
"""Calls of `maintain` (one per request, more while idle) a failed request's missing stall reports are awaited."""


class Rank0Side:
    """Rank-0 membership methods of `Engine` (a mixin: no state of its own)."""

    def maintain(self) -> None:
        """Rank 0, between requests (`infer` calls it): close a liveness round that is due, take in workers
        that joined, drop workers that left, and build a new epoch when any of that changed who is there.
        Never waits for a peer longer than `regroup_timeout_s` (building groups)."""
        if self._membership is None or self._closed:
            return
        self._learn_from_stall()
        membership = self._membership
        changed = False
        now = time.monotonic()
        if now >= self._next_join_check:  # also while a round is open: a replacement process settles it
            self._next_join_check = now + self.config.join_check_s
            left = membership.departures()
            changed = bool(membership.admit_waiting() or left or self._tamper_reports())
        if membership.round is not None:
            if membership.poll_round() is None:
                return
            changed = True
        if changed:
            self._form_epoch()

    def tick(self) -> None:
        """Rank 0, from a thread of the application while no request runs: `maintain()` under the
        engine's lock (a request in flight is never interrupted; the tick then waits for it)."""
        with self._lock:
            self.maintain()

    def _form_epoch(self) -> None:
        retire_lanes(self._lanes, self.config.group_timeout_s + 1.0)
        self._epoch += 1
        members = tuple(sorted({0, *self._control.sessions}))
        config = self.config
        keys = LaneKeys(admission_key(self._secret), self._membership.boot_nonce, self.sealed)
        self._control.broadcast_json({"op": "epoch", "epoch": self._epoch, "members": list(members),
                                      "timeout_s": config.group_timeout_s,
                                      "build_timeout_s": config.regroup_timeout_s, "sealed": keys.sealed})
        try:
            self._lanes = build_epoch_lanes(self.ctx, self._store, self._epoch, self.profile, members,
                                            config.group_timeout_s, config.regroup_timeout_s, self._bind_addr,
                                            keys)
        except RuntimeError as err:  # a member left between answering and connecting
            log.warning("epoch %d over ranks %s did not connect: %s", self._epoch, list(members), err)
            self._end_epoch(f"epoch {self._epoch} did not connect", 0.0)
            return
        self._members = members
        self._membership.joined.clear()
        log.info("epoch %d: lanes over ranks %s", self._epoch, list(members))

    def _blame(self, err: PeerError, plan: Plan) -> None:
        """After a failed request: a lane message that did not open (TamperError) drops its sender, who must
        join again (a new session, and new lane keys with the next epoch). docs/SECURITY.md."""
        self._blame_lane(err, tuple(plan.ranks))

    def _blame_lane(self, err: BaseException, ranks: tuple[int, ...]) -> None:
        """`_blame` on the lane over `ranks` (a request's plan, or a job's members)."""
        if not isinstance(err, TamperError) or not 0 < err.src < len(ranks):
            return
        rank = ranks[err.src]
        self.tampered += 1
        log.warning("rank %d's lane message did not open; dropping it (%s)", rank, err)
        if rank in self._control.sessions:
            self._membership.evict(rank, f"a lane message did not open: {err}")

    def _tamper_reports(self) -> bool:
        """Drop the peer a worker's authentic tamper report blames (the reporter itself when it blames rank 0)."""
        dropped = False
        for reporter, blamed, epoch in read_reports(self._store, self._control.sessions):
            rank = reporter if blamed == 0 else blamed
            self.tampered += 1
            log.warning("rank %d reports that a lane message from rank %d in epoch %d did not open; dropping rank %d",
                        reporter, blamed, epoch, rank)
            if rank in self._control.sessions:
                self._membership.evict(rank, f"rank {reporter}: a lane message from rank {blamed} did not open")
                dropped = True
        return dropped

    def pin_store_key(self, key: str, value: bytes) -> None:
        """Rank 0: keep `key` at `value` in the store (restored between requests if someone changes it)."""
        if self._membership is not None:
            self._membership.pinned[key] = value

    def security_counts(self) -> dict[str, int]:
        """Rank 0: security events since start (served as gauges on /metrics, docs/SECURITY.md)."""
        membership = self._membership
        return {"refused_joins": membership.num_refused if membership is not None else 0,
                "skipped_join_slots": membership.skipped_slots if membership is not None else 0,
                "restored_store_keys": membership.restored if membership is not None else 0,
                "tampered_lane_messages": self.tampered, "sealed_lanes": int(self.sealed)}

    def _end_epoch(self, why: str, stall_s: float) -> None:
        """Stop using the current lanes and ask who is still there (answers due within the round)."""
        retire_lanes(self._lanes, self.config.group_timeout_s + 1.0)
        self._members = (0,)
        self._epoch += 1
        log.warning("%s: epoch over; asking ranks %s who is still there", why, sorted(self._control.sessions))
        self._membership.start_round(self._epoch, self.config.regroup_timeout_s + stall_s)

    def release_workers(self) -> None:
        """Rank 0: return the workers from `serve_workers()` with every lane kept, so that the caller can
        use the ranks for something else and call `serve_workers()` again (the benchmark's peers).
        Requests sent meanwhile would wait: only call it between requests, and resume the workers first."""
        if not self.ctx.is_root:
            raise RuntimeError("release_workers is for rank 0")
        if self._control is not None:
            self._control.broadcast_json({"op": "release"})

    def run_job(self, name: str, args: dict, progress=None) -> list[dict]:
        """Rank 0: run a registered measurement job (edgeprism.runtime.cluster_jobs.JOBS) on every member of
        the current epoch at once → each member's result, in rank order (`healthy_ranks`). ValueError for an
        unknown job or bad arguments; JobError naming the rank a job failed on; RuntimeError when a member
        is lost (the epoch then ends, as after a failed request). `progress(done, total, label)`: rank 0's."""
        if not self.ctx.is_root:
            raise RuntimeError("run_job is for rank 0")
        check_job(name, args)
        with self._lock:
            self.maintain()
            members = self._members
            context = lane_job_context(self._lanes, members, self.model, progress)
            if context is None:
                raise RuntimeError(f"job {name!r} needs devices: only ranks {list(members)} are connected")
            self._control.broadcast_json({"op": "job", "epoch": self._epoch, "name": name, "args": args},
                                         ranks=members[1:])
            try:
                return run_job_here(context, name, args, members)
            except (PeerError, RuntimeError) as err:  # JobError included: a rank may have left mid-collective
                self.failures += 1
                self._blame_lane(err, members)  # a sealed result that did not open drops its sender
                self._end_epoch(f"job {name} failed", 0.0)
                if isinstance(err, JobError):
                    raise
                raise RuntimeError(f"job {name!r} over ranks {list(members)} failed: {err}") from err
    def _learn_compute(self, plan: Plan, request: Request, row) -> None:
        """Fold measured vs predicted compute into the online compute bias (local vs distributed)."""
        link = replace(self.estimator.estimate(), local_compute_scale=1.0)  # the profile's own prediction
        predicted = predict(self.profile, request, plan, link).compute_s
        self.compute_bias.update(plan.mode, row.compute_s, predicted)

    def _fall_back(self, err: PeerError, inputs, plan, request, link, request_id, want, spent_s: float):
        """A distributed request failed: end the epoch, rerun it locally (the exact answer), say so in the row."""
        self.failures += 1
        reason = (f"distributed over ranks {list(plan.ranks)} failed after {spent_s:.2f} s "
                  f"({err}); rerun on rank 0")
        log.warning("request %s: %s", request_id, reason)
        self._note_stall(plan, request, request_id)
        self._end_epoch(f"request {request_id} failed", self.config.stall_s(plan.predicted_latency_s))
        self._blame(err, plan)
        if self.meter is not None:  # the window restarts with the rerun; the failed part is in latency_s only
            self.meter.end_window(request_id)
            self.meter.begin_window(request_id)
        return self._run_local(inputs, as_local_plan(plan, request), request, link, request_id, want,
                               fallback=reason, spent_s=spent_s)

    def _split_of(self, lane, codec: str, micro_batches: int):
        """The lane's `PositionWise` for `codec` and the plan's micro-batch count with this engine's settings
        (built once, then reused)."""
        return lane.transform(self.model, codec, self.config.size_aware, self.config.overlap, micro_batches)

    def _note_stall(self, plan: Plan, request: Request, request_id: str) -> None:
        """A distributed request failed: keep rank 0's progress in it, to learn the ranks' speeds from their
        stall reports as they arrive (`_learn_from_stall`; runtime/stall_reports.py)."""
        lane = self._lanes.get(tuple(plan.ranks))
        if lane is None or not self.config.learn_speeds:
            return
        own = progress_of(self._epoch, request_id, self._split_of(lane, plan.codec, plan.micro_batches).timeline)
        self._stalled = PendingStall(plan, request, own, STALL_WAIT)

    def _learn_from_stall(self) -> None:
        """Between requests: fold the failed request's per-layer compute rates (rank 0's own and those the
        workers reported) into the speed estimate; a slowed device that made the request miss its deadline
        is then learned as one that finished in time would be. Reports are awaited for `STALL_WAIT` calls."""
        pending = self._stalled
        if pending is None:
            return
        plan, own = pending.plan, pending.own
        reports = {rank: r for rank, r in read_stall_reports(self._store, self._control.sessions).items()
                   if r.epoch == own.epoch and r.request_id == own.request_id and rank in plan.ranks}
        if len(reports) < len(plan.ranks) - 1 and pending.waits > 1:
            self._stalled = pending._replace(waits=pending.waits - 1)
            return  # some reports may still be on their way (a straggler is still computing)
        self._stalled = None
        done = {0: own, **reports}
        per_request = rank_compute_s(self.profile, pending.request.batch, plan.token_counts,
                                     self.profile.codec(plan.codec))
        num_layers = self.model.config.num_layers
        ranks = [rank for rank in plan.ranks if rank in done and done[rank].layers_done > 0]
        if 0 not in ranks or len(ranks) < 2:
            return
        predicted = [per_request[plan.ranks.index(rank)] * done[rank].layers_done / num_layers for rank in ranks]
        measured = [done[rank].compute_s for rank in ranks]
        log.info("request %s stalled: layers done %s, compute %s s; learning speeds from them", own.request_id,
                 [done[rank].layers_done for rank in ranks], [round(m, 3) for m in measured])
        self.speed_estimator.update(ranks, predicted, measured)

    def _learn_speeds(self, plan: Plan, request: Request, per_rank, decoded: bool = False) -> None:
        """Fold each plan rank's compute seconds (`RankTelemetry.compute_s`) into the per-device speed
        estimate (`runtime.compute_estimate`); a local request only ages the devices' last observations.
        `decoded`: the plan's last rank also decoded new tokens alone after the prefill, which its prediction
        does not hold, so it is left out of this request."""
        if not self.config.learn_speeds:
            return
        if plan.mode == "local" or len(per_rank) != len(plan.ranks):
            self.speed_estimator.update((), (), ())
            return
        predicted = rank_compute_s(self.profile, request.batch, plan.token_counts, self.profile.codec(plan.codec))
        measured = [r.compute_s for r in per_rank]
        self.speed_estimator.update(plan.ranks, predicted, measured, exclude=(plan.ranks[-1],) if decoded else ())

    def _energy(self, request_id: str, phases: list[tuple[float, float, float]]) -> tuple[float, str]:
        """Energy of the plan's ranks. Modelled from each rank's (compute, staging, link) seconds with the profile's
        power model, as the cost model charges them: compute is the rank's own work (`RankTelemetry.compute_s`: an
        overlapped exchange's link time ran beside it, so it is not taken off), and the link draws its power for
        all of its time, hidden or not. With a meter, rank 0's part is metered instead (the others stay modelled,
        and the source says so)."""
        e = self.profile.energy
        modelled = [e.compute_w * max(0.0, compute) + e.staging_w * staging + e.network_w * link
                    for compute, staging, link in phases]
        if self.meter is None:
            return sum(modelled), "modelled"
        measurement = self.meter.end_window(request_id)
        if len(phases) == 1:
            return measurement.energy_j, measurement.source
        return measurement.energy_j + sum(modelled[1:]), f"{measurement.source} rank 0 + modelled others"

    def _row(self, request_id, plan, request, link, latency_s, energy_j, source, bytes_exchanged, layer_nbytes,
             staging_s, collective_s, delay_s, fallback: str = "", timeline: list | None = None,
             cpu_s: float | None = None) -> MetricsRow:
        return MetricsRow(
            request_id=request_id, plan=json.loads(plan.to_json()), mode=plan.mode, batch=request.batch,
            num_tokens=request.num_tokens, predicted_latency_s=plan.predicted_latency_s, latency_s=latency_s,
            predicted_energy_j=plan.predicted_energy_j, energy_j=energy_j, energy_source=source,
            bytes_exchanged=bytes_exchanged, layer_nbytes=layer_nbytes, staging_s=staging_s,
            collective_s=collective_s, compute_s=max(0.0, latency_s - staging_s - collective_s),
            emulated_delay_s=delay_s, link_bandwidth_bps=link.bandwidth_bps, link_latency_s=link.latency_s,
            blew_prediction=latency_s > self.config.blow_factor * plan.predicted_latency_s,
            fidelity_loss=0.0 if plan.mode == "local" else plan.fidelity_loss, fallback=fallback,
            timeline=timeline or [], cpu_s=cpu_s)

    def _probe(self) -> None:
        """Measure the link over the largest lane: a synchronising exchange, then a small and a large one."""
        if not self._lanes:
            return
        ranks = max(self._lanes, key=len)
        exchanger = self._lanes[ranks].exchanger
        stall_s = self.config.min_stall_s
        stats = start_recording(exchanger)
        exchanger.deadline = time.monotonic() + stall_s
        try:
            self._control.broadcast_json({"op": "probe", "epoch": self._epoch, "ranks": list(ranks),
                                          "nbytes": self.config.probe_nbytes, "stall_s": stall_s},
                                         ranks=ranks[1:])
            probe_exchanges(exchanger, self.config.probe_nbytes)
        except PeerError as err:
            self.failures += 1
            self._end_epoch(f"link probe failed: {err}", stall_s)
            return
        finally:
            exchanger.deadline = None
        k = len(ranks)
        found = [
            LinkObservation((k - 1) * sent, k - 1, delay_s + wait_s)
            for kind, sent, delay_s, wait_s in stats.events
            if kind == "probe"
        ]
        log.info("link probe over ranks %s: %s", list(ranks), self.estimator.update(found))

    def cluster_status(self) -> dict:
        """Rank 0: who is in the cluster — every rank with its state (serving: in the current epoch's
        lanes; admitted: joined, waiting for the next epoch; absent), what its process said of itself
        (host, device, cores), its measured speed from the profile, the live link estimate, and the
        last errors (refused joins, drops, departures) with their unix times."""
        if not self.ctx.is_root:
            raise RuntimeError("cluster_status is for rank 0")
        membership = self._membership
        sessions = self._control.sessions if self._control is not None else {}
        speeds = self.profile.device_speeds
        link = self.estimator.estimate()
        ranks = []
        for rank in range(self.ctx.world_size):
            state = ("serving" if rank in self._members else "admitted" if rank in sessions else "absent")
            entry = {"rank": rank, "state": state,
                     "speed": speeds[rank] if rank < len(speeds) else None}
            if rank == 0:
                entry.update(self.self_info)
            elif membership is not None and rank in sessions:
                entry.update(membership.member_info(rank))
            ranks.append(entry)
        events = membership.events if membership is not None else []
        return {"model": self.model.config.name, "world_size": self.ctx.world_size, "epoch": self._epoch,
                "members": list(self._members), "ranks": ranks,
                "link": {"bandwidth_bps": link.bandwidth_bps, "latency_s": link.latency_s},
                "requests": self._requests, "failures": self.failures,
                "last_errors": [{"time": t, "what": what} for t, what in events[-10:]]}


def as_local_plan(plan: Plan, request: Request) -> Plan:
    """`plan` turned into rank 0 alone (a fallback, or a plan over ranks with no process group)."""
    return replace(plan, mode="local", ranks=(0,), token_shares=(1.0,), token_counts=(request.num_tokens,), codec="",
                   cr=1, wire_dtype="", fidelity_loss=0.0)


__all__ = ["Rank0Side", "as_local_plan"]
