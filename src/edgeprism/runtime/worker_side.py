"""The engine's side on ranks other than 0: wait for rank 0's next message and do it.

`Engine` inherits this; the state it uses (`ctx`, `model`, `profile`, `config`, the mailbox, store,
secret, lanes, epoch and members) is the engine's own, set up in `Engine.__init__`.
"""

from __future__ import annotations

import logging
import time

from edgeprism.comm.exchange import PeerError
from edgeprism.comm.sealing import TamperError
from edgeprism.plan import Plan
from edgeprism.runtime.cluster_jobs import lane_job_context, run_job_here
from edgeprism.runtime.control import ControlError, Mailbox
from edgeprism.runtime.groups import LaneKeys, build_epoch_lanes, retire_lanes, start_digests, start_recording
from edgeprism.runtime.joining import acknowledge, admission_key, describe_self, join_cluster
from edgeprism.runtime.stall_reports import report_stall
from edgeprism.runtime.tamper import report_tamper
from edgeprism.runtime.telemetry import probe_exchanges, sync, telemetry

log = logging.getLogger("edgeprism.runtime.engine")  # one logger for both sides of the engine


class WorkerSide:
    """Worker-rank methods of `Engine` (a mixin: no state of its own)."""

    def serve_workers(self) -> int:
        """Worker loop: wait for rank 0's next message and do it (our part of a plan, a probe, a ping, a
        new epoch), until shutdown. Returns the number of distributed requests this rank took part in."""
        if self.ctx.is_root:
            raise RuntimeError("serve_workers is for ranks other than 0")
        if self._mailbox is None:
            return 0
        return self._serve(until_epoch=False)

    def _serve(self, until_epoch: bool) -> int:
        served = 0
        while True:
            message = self._mailbox.receive(self.config.idle_timeout_s)
            op = message["op"]
            if op == "release":  # back to the caller with the lanes kept: rank 0 will serve again
                return served
            if op == "shutdown":
                log.info("rank %d: shutdown after %d requests", self.ctx.group_rank, served)
                retire_lanes(self._lanes, background=False)  # not at interpreter exit (see retire_lanes)
                return served
            if op == "ping":
                acknowledge(self._store, self._mailbox.session, message["epoch"])
            elif op == "epoch":
                self._join_epoch(message)
                if until_epoch and self._lanes:
                    return served
            elif op == "evicted":
                retire_lanes(self._lanes, self.config.group_timeout_s + 1.0)
                if not message["rejoin"]:
                    raise RuntimeError(f"rank 0 dropped rank {self.ctx.group_rank}: {message['reason']}")
                log.warning("rank %d: rank 0 dropped us (%s); joining again", self.ctx.group_rank, message["reason"])
                session = join_cluster(self._store, self._secret, self.ctx.group_rank,
                                       start_digests(self.model, self.profile), self.config.start_timeout_s)
                describe_self(self._store, session, self.self_info)
                self._mailbox = Mailbox(self._store, session)
            elif op in ("infer", "probe"):
                served += self._take_part(message)
            elif op == "job":
                self._take_job(message)
            else:
                raise ControlError(f"rank 0 sent {op!r} where a worker's message was expected")

    def _join_epoch(self, message: dict) -> None:
        retire_lanes(self._lanes, self.config.group_timeout_s + 1.0)
        members = tuple(message["members"])
        self._epoch = message["epoch"]
        if self.ctx.group_rank not in members:
            return
        keys = LaneKeys(admission_key(self._secret), self._mailbox.session.boot_nonce, message["sealed"])
        try:
            self._lanes = build_epoch_lanes(self.ctx, self._store, self._epoch, self.profile, members,
                                            float(message["timeout_s"]), float(message["build_timeout_s"]),
                                            self._bind_addr, keys)
            self._members = members
        except RuntimeError as err:
            log.warning("rank %d: epoch %d did not connect: %s", self.ctx.group_rank, self._epoch, err)

    def _take_job(self, message: dict) -> None:
        """Our part of a measurement job on the epoch's lane over every member (edgeprism.runtime.cluster_jobs);
        a job's own failure goes to rank 0 in its results, a lost peer drops the lanes."""
        context = lane_job_context(self._lanes, self._members, self.model)
        if message["epoch"] != self._epoch or context is None:
            return
        try:
            run_job_here(context, message["name"], message["args"], self._members)
        except (PeerError, RuntimeError) as err:
            log.warning("rank %d: job %s of epoch %d failed (%s); waiting for rank 0", self.ctx.group_rank,
                        message["name"], self._epoch, err)
            if isinstance(err, TamperError):  # a sealed result that did not open: rank 0 drops the sender
                report_tamper(self._store, self._mailbox.session, self._epoch, self._members[err.src])
            retire_lanes(self._lanes, self.config.group_timeout_s + 1.0)

    def _take_part(self, message: dict) -> int:
        """Our part of a distributed request or probe; 1 if a request was served. A failure drops the lanes
        (rank 0 asks who is left next)."""
        if message["epoch"] != self._epoch:
            return 0  # from an epoch that has ended
        if message["op"] == "probe":
            lane = self._lanes.get(tuple(message["ranks"]))
        else:
            try:
                plan = Plan.from_dict(message["plan"])
            except (KeyError, TypeError, ValueError) as err:
                raise ControlError(f"rank 0 sent a malformed plan: {err}") from None
            lane = self._lanes.get(tuple(plan.ranks))
        if lane is None or lane.exchanger is None:
            return 0  # not in this plan: straight back to waiting
        exchanger = lane.exchanger
        exchanger.deadline = time.monotonic() + float(message["stall_s"])
        transform = None
        try:
            if message["op"] == "probe":
                probe_exchanges(exchanger, message["nbytes"])
                return 0
            stats = start_recording(exchanger)
            start = time.perf_counter()
            transform = lane.transform(self.model, plan.codec, self.config.size_aware, self.config.overlap)
            split = message["split"]
            if split["generate"]:
                transform.generate(None, split["generate"], header=split)
            else:
                transform.forward(None, header=split)
            sync(self.ctx.device)
            telemetry(exchanger, stats, time.perf_counter() - start, self.model.config.num_layers)
            return 1
        except PeerError as err:
            log.warning("rank %d: request of epoch %d failed (%s); waiting for rank 0", self.ctx.group_rank,
                        self._epoch, err)
            if isinstance(err, TamperError):  # rank 0 drops the sender (docs/SECURITY.md)
                report_tamper(self._store, self._mailbox.session, self._epoch, lane.ranks[err.src])
            elif transform is not None:  # how far we got: a straggler is learned from a stall too
                try:
                    report_stall(self._store, self._mailbox.session, self._epoch, message["request_id"],
                                 transform.timeline)
                except (RuntimeError, OSError) as store_err:
                    log.warning("rank %d: could not report the stall (%s)", self.ctx.group_rank, store_err)
            retire_lanes(self._lanes, self.config.group_timeout_s + 1.0)
            return 0
        finally:
            exchanger.deadline = None


__all__ = ["WorkerSide"]
