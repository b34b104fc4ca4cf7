"""Who is in the cluster: authenticated admission of worker processes, liveness rounds and epochs.

Everything goes through the rendezvous store (a TCPStore rank 0 hosts, or torchrun's), under the
prefix `edgeprism/`:

- `auth/boot`: rank 0's random boot nonce.
- `join/slots`: a counter; a joining worker takes the next slot n and writes `join/{n}`, a fixed-size
  binary request MAC'd with the cluster secret (edgeprism.comm.auth). Rank 0 checks it before reading
  any field, compares the worker's start digests (model config, weights, profile) with its own, and
  writes `join/{n}/reply`: a sealed `admitted` or `refused` message, or the bare marker
  `UNAUTHENTICATED` (the requester holds no key to check a sealed reply with).
- `ctl/{n}/{i}`: the worker's mailbox (edgeprism.runtime.control).
- `ack/{epoch}/{rank}`: a worker's sealed answer to a `ping` of a liveness round.
- `info/{n}`: what an admitted worker says of itself (host, device, cores), sealed with its session key.
- `leave/{n}`: a worker leaving on purpose (Ctrl-C), sealed; rank 0 plans without it from then on.

The worker's side of these keys (join, info, ack, leave) is `runtime/joining.py`.

A join may ask for a rank (a local cluster restarting rank r) or for rank 0, which means "any": rank 0
then gives the lowest free rank (a device joining a coordinator over the network).

An *epoch* is one set of data lanes (GLOO groups) over the members rank 0 last found alive. A failed
request ends the epoch; a ping round (bounded by `regroup_timeout_s`) finds who is still there, and
the next epoch is built over them. A worker that comes back, or a restarted process, joins again
through `join/` and rank 0 builds a new epoch that includes it, between two requests.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

from edgeprism.comm.auth import NONCE_BYTES, AuthError, decode_join, open_sealed, seal, session_key
from edgeprism.runtime.control import ControlChannel, ControlError, Session, encode_control, take_sealed
from edgeprism.runtime.joining import MAX_INFO_BYTES, UNAUTHENTICATED, admission_key

log = logging.getLogger(__name__)

JOIN_WINDOW = 64
"""Join slots rank 0 keeps open at once; a counter that jumps further was moved by someone on the store."""
STALE_SLOT_S = 30.0
"""A slot taken but not written for this long is skipped (its taker is not a joining device)."""


@dataclass
class LivenessRound:
    """A ping round: the epoch it will build, whom it asked, by when they must answer."""

    epoch: int
    asked: dict[int, int]
    """rank → the join slot of the process asked (a rank taken over by a newer process is settled)."""
    deadline: float
    acked: set[int] = field(default_factory=set)


class Membership:
    """Rank 0's view: admitted sessions (in `control.sessions`), the current members, pending rounds."""

    def __init__(self, store, secret: bytes | None, world_size: int, digests: dict[str, bytes],
                 control: ControlChannel, boot_nonce: bytes | None = None, devices: tuple = ()) -> None:
        self.store = store
        self.devices = devices
        """The profile's `DeviceDescription` per rank (a profile of a joined cluster); empty: not checked."""
        self.key = admission_key(secret)
        self.world_size = world_size
        self.digests = digests
        self.control = control
        self.boot_nonce = boot_nonce or os.urandom(NONCE_BYTES)
        self.store.set("auth/boot", self.boot_nonce)
        self.pinned: dict[str, bytes] = {"auth/boot": self.boot_nonce}
        """Keys rank 0 published that must keep their value (the boot nonce, a coordinator's sealed spec):
        one found changed (someone on the store) is written back on every `admit_waiting`."""
        self.restored = 0
        self._next_slot = 1
        self._handled: set[int] = set()
        """Slots at or after `_next_slot` already handled (a later slot can be written before an earlier)."""
        self._unwritten: dict[int, float] = {}
        """Slot → when it was first seen taken but unwritten."""
        self.round: LivenessRound | None = None
        self.joined: set[int] = set()
        """Ranks admitted since the current epoch was built (they wait for the next one)."""
        self.refusals: list[str] = []
        """The first refusals (at most 50: a flood of bad joins must not grow rank 0's memory)."""
        self.num_refused = 0
        self.skipped_slots = 0
        """Join slots taken but never written, or jumped over (someone on the store, not a device)."""
        self.events: list[tuple[float, str]] = []
        """(unix time, what happened) of refusals, evictions and departures: the cluster's last errors."""
        self.info: dict[int, dict] = {}
        """rank → what its process said of itself (`info/{slot}`), read when it is first asked for."""

    def _refuse(self, reason: str) -> None:
        self.num_refused += 1
        if len(self.refusals) < 50:
            self.refusals.append(reason)

    def _event(self, text: str) -> None:
        self.events = [*self.events[-49:], (time.time(), text)]

    # --- admission ---
    def admit_waiting(self) -> list[int]:
        """Handle every complete join request in the store; returns the ranks admitted now."""
        admitted = []
        self._restore_pinned()
        slots = self.store.add("join/slots", 0)
        now = time.monotonic()
        if slots - self._next_slot >= JOIN_WINDOW:  # a jump no joining device makes (someone on the store)
            self._event(f"join slots {self._next_slot}..{slots - JOIN_WINDOW} skipped: the counter jumped")
            self.skipped_slots += slots - JOIN_WINDOW + 1 - self._next_slot
            self._next_slot = slots - JOIN_WINDOW + 1
        for slot in range(self._next_slot, slots + 1):
            if slot in self._handled:
                continue
            if not self.store.check([f"join/{slot}"]):
                self._unwritten.setdefault(slot, now)  # taken but not written yet: next time
                continue
            self._handled.add(slot)
            blob = self.store.get(f"join/{slot}")
            self.store.delete_key(f"join/{slot}")
            try:
                rank, nonce, digests = decode_join(self.key, self.boot_nonce, slot, blob)
            except AuthError as err:
                log.warning("refused a join: %s", err)
                self._refuse(str(err))
                self._event(f"refused a join: {err}")
                self.store.set(f"join/{slot}/reply", UNAUTHENTICATED)
                continue
            asked = rank
            session = Session(rank, slot, session_key(self.key, self.boot_nonce, slot, nonce))
            said = self._said(session) if self.devices else {}
            rank = self._free_rank(said) if asked == 0 else asked
            session.rank = rank
            problem = self._problem(rank, digests) or self._device_problem(rank, said)
            if problem:
                log.warning("refused %s's join: %s", f"rank {asked}" if asked else "a device", problem)
                self._refuse(problem)
                self._event(f"refused a join: {problem}")
                self._reply(session, {"op": "refused", "reason": problem})
                continue
            old = self.control.sessions.get(rank)
            if old is not None:
                log.warning("rank %d joined again (slot %d); its old process (slot %d) is dropped", rank, slot,
                            old.slot)
                self.evict(rank, "a newer process joined as this rank", rejoin=False)
            self._reply(session, {"op": "admitted", "rank": rank})
            self.control.sessions[rank] = session
            self.info.pop(rank, None)
            if said:
                self.info[rank] = said
            self.joined.add(rank)
            admitted.append(rank)
            log.info("admitted rank %d (slot %d)", rank, slot)
        self._advance_slots(slots, now)
        return admitted

    def _restore_pinned(self) -> None:
        for key, value in self.pinned.items():
            if not self.store.check([key]) or self.store.get(key) != value:
                self.store.set(key, value)
                self.restored += 1
                log.warning("store key %s was deleted or overwritten (someone on the store); restored it", key)
                self._event(f"store key {key} was deleted or overwritten; restored")

    def _advance_slots(self, slots: int, now: float) -> None:
        """Move past handled slots, and past slots taken but left unwritten for `STALE_SLOT_S` (a joining
        device writes its request right after taking its slot; a stranger on the store may not)."""
        while self._next_slot <= slots:
            slot = self._next_slot
            if slot not in self._handled:
                if now - self._unwritten.get(slot, now) <= STALE_SLOT_S:
                    return
                self.skipped_slots += 1
                self._event(f"skipped join slot {slot}: taken but never written within {STALE_SLOT_S:.0f} s")
            self._handled.discard(slot)
            self._unwritten.pop(slot, None)
            self._next_slot += 1

    def _free_rank(self, said: dict | None = None) -> int:
        """The lowest rank no admitted process holds (-1 when the cluster is full); with the profile's device
        descriptions, the lowest free one whose recorded device is like the one the joining process `said`
        it is (its speed in the profile is then its own)."""
        free = [r for r in range(1, self.world_size) if r not in self.control.sessions]
        alike = [r for r in free if said and not self._device_problem(r, said)]
        return alike[0] if alike else free[0] if free else -1

    def _said(self, session: Session) -> dict:
        """What a joining process wrote of itself before asking (`join_cluster(..., info=)`), or {}."""
        key = f"info/{session.slot}"
        if not self.store.check([key]):
            return {}
        try:
            info = json.loads(open_sealed(session.key, b"info", session.slot, self.store.get(key),
                                          MAX_INFO_BYTES).decode())
        except (AuthError, UnicodeDecodeError, json.JSONDecodeError) as err:
            log.warning("a joining process's self-description was refused: %s", err)
            return {}
        return info if isinstance(info, dict) else {}

    def _device_problem(self, rank: int, said: dict) -> str:
        """Why a device that `said` what it is cannot be `rank` of a cluster whose profile recorded each rank's
        device; "" when it matches (or nothing was recorded, or it said nothing)."""
        if not self.devices or not said or not 1 <= rank < len(self.devices):
            return ""
        recorded = self.devices[rank]
        kind, cores = said.get("device_kind"), said.get("num_cores")
        if (kind, cores) == (recorded.device_kind, recorded.num_cores):
            return ""
        free = [str(self.devices[r]) for r in range(1, self.world_size)
                if r not in self.control.sessions] or [str(recorded)]
        return (f"this device ({kind}, {cores} cores, host {said.get('host', '?')}) matches none of the profile's "
                f"free device ranks ({'; '.join(free)}): the profile was measured on other devices. Profile the "
                f"cluster again (`edgeprism profile --listen ...`, or `edgeprism serve --listen` without "
                f"--profile), or start this device as profiled (e.g. --cores with that many cores)")

    def _problem(self, rank: int, digests: bytes) -> str:
        if rank == -1:
            return (f"the cluster is full: all {self.world_size - 1} device ranks of a world of {self.world_size} "
                    f"are taken (ranks {sorted(self.control.sessions)}); start the coordinator with a larger "
                    f"--world-size, or stop a device first")
        if not 1 <= rank < self.world_size:
            return f"rank {rank} is outside 1..{self.world_size - 1} for a world of {self.world_size}"
        mine = b"".join(self.digests.values())
        differing = [name for i, name in enumerate(self.digests)
                     if digests[32 * i:32 * (i + 1)] != mine[32 * i:32 * (i + 1)]]
        if differing:
            return (f"ranks did not start alike (rank {rank}: {', '.join(differing)} differ from rank 0's): start "
                    f"every rank with the same model, checkpoint (or seed) and profile")
        return ""

    def _reply(self, session: Session, message: dict) -> None:
        self.store.set(f"join/{session.slot}/reply", seal(session.key, b"admit", session.slot, encode_control(message)))

    def wait_for_all(self, timeout_s: float, alive=None) -> None:
        """At start: admit ranks 1..world-1. ValueError (the same text the refused worker gets) when a rank
        starts differently; RuntimeError on a failed authentication or when `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        wanted = set(range(1, self.world_size))
        while not wanted <= set(self.control.sessions):
            self.admit_waiting()
            if self.refusals:
                problem = self.refusals[0]
                for rank in list(self.control.sessions):
                    self.evict(rank, f"the cluster did not start: {problem}", rejoin=False)
                if problem.startswith("join request"):
                    raise AuthError(problem)
                raise ValueError(problem)
            if alive is not None:
                alive()
            if time.monotonic() > deadline:
                missing = sorted(wanted - set(self.control.sessions))
                raise RuntimeError(f"ranks {missing} did not join within {timeout_s:.0f} s")
            time.sleep(0.01)
        self.joined.clear()

    # --- liveness ---
    def evict(self, rank: int, reason: str, rejoin: bool = True) -> None:
        """Drop rank's session; tell its process why, and whether to join again."""
        session = self.control.sessions.get(rank)
        if session is None:
            return
        self._event(f"rank {rank} dropped: {reason}")
        try:
            self.control.post(rank, {"op": "evicted", "reason": reason, "rejoin": rejoin})
        finally:
            del self.control.sessions[rank]
            self.joined.discard(rank)

    def departures(self) -> list[int]:
        """Ranks whose process said it is leaving (`leave/{slot}`, sealed); their sessions are dropped."""
        gone = []
        for rank, session in sorted(self.control.sessions.items()):
            try:
                if take_sealed(self.store, f"leave/{session.slot}", session, b"leave", session.slot) is None:
                    continue
            except ControlError as err:
                log.warning("a leave notice for rank %d was refused: %s", rank, err)
                continue
            log.info("rank %d left the cluster", rank)
            self._event(f"rank {rank} left")
            del self.control.sessions[rank]
            self.joined.discard(rank)
            self.info.pop(rank, None)
            gone.append(rank)
        return gone

    def member_info(self, rank: int) -> dict:
        """What rank's process said of itself at admission (empty when it said nothing, or not validly)."""
        session = self.control.sessions.get(rank)
        if session is None:
            return {}
        if rank not in self.info and self.store.check([f"info/{session.slot}"]):
            try:
                body = open_sealed(session.key, b"info", session.slot, self.store.get(f"info/{session.slot}"),
                                   MAX_INFO_BYTES)
                info = json.loads(body.decode())
                self.info[rank] = info if isinstance(info, dict) else {}
            except (AuthError, UnicodeDecodeError, json.JSONDecodeError) as err:
                log.warning("rank %d's self-description was refused: %s", rank, err)
                self.info[rank] = {}
        return self.info.get(rank, {})

    def start_round(self, epoch: int, timeout_s: float) -> None:
        """Ask every admitted worker to answer by `timeout_s`; `poll_round` settles the round."""
        asked = {rank: session.slot for rank, session in self.control.sessions.items()}
        self.round = LivenessRound(epoch, asked, time.monotonic() + timeout_s)
        for rank in sorted(asked):
            self.control.post(rank, {"op": "ping", "epoch": epoch})

    def poll_round(self) -> set[int] | None:
        """None while the round is open; else the ranks that answered (the others are evicted). A rank whose
        process left, or was replaced by a newer process that joined meanwhile, no longer holds the round up:
        the newer process is alive (it just joined) and counts as an answer."""
        round_ = self.round
        if round_ is None:
            return None
        for rank, slot in sorted(round_.asked.items()):
            if rank in round_.acked:
                continue
            session = self.control.sessions.get(rank)
            if session is None or session.slot != slot:  # gone, or taken over by a newer process
                round_.acked.add(rank)
                continue
            try:
                if take_sealed(self.store, f"ack/{round_.epoch}/{rank}", session, b"ack", round_.epoch) is not None:
                    round_.acked.add(rank)
            except ControlError as err:
                log.warning("rank %d's answer to ping %d was refused: %s", rank, round_.epoch, err)
        if round_.acked != set(round_.asked) and time.monotonic() < round_.deadline:
            return None
        for rank in sorted(set(round_.asked) - round_.acked):
            log.warning("rank %d did not answer within the liveness round; planning without it", rank)
            self.evict(rank, f"no answer to ping {round_.epoch}")
        self.round = None
        return {rank for rank in round_.acked if rank in self.control.sessions}


__all__ = ["LivenessRound", "Membership"]
