"""No single point of failure: a configured succession of coordinators, and the device that walks it.

Every machine of the cluster is given the same ordered list of coordinator addresses (`--coordinators
A:P,B:P,C:P`) and its own place in it (`--listen`). The rule, with no vote:

1. **The earliest serving address is the coordinator.** "Serving" means: a store answers at the address
   and publishes a cluster spec sealed with this cluster's secret (a stranger's store does not count).
2. **A device joins the first address of the list that serves** (a sweep over every other address, in
   list order). Having lost its coordinator, it sweeps again (no restart of the process).
3. **A device promotes itself** only when a sweep finds no address serving, it has held the cluster's
   spec (it was a member once: it knows the model, seed, engine settings, profile and world size), and a
   second sweep `position × promote_delay_s` later still finds none. The wait orders the candidates:
   the earliest live address in the list promotes first and the later ones find it on their second sweep.
   The promoted device starts the store, the coordinator (rank 0) and, when the spec says the cluster
   served HTTP, the API, on its own `--listen` address (the spec's `service`).
4. **An incumbent is never pre-empted by a latecomer:** a machine that comes back (the old coordinator
   restarted, by `serve` or `join`) sweeps first and joins whoever serves, as a device.
5. **A coordinator steps down when an earlier address serves** (checked every `step_down_check_s`): it
   closes its engine (its devices are told the session ended and sweep again) and joins that address as
   a device. This is what heals a split brain after a network partition: while the partition lasts each
   side may have its own coordinator (each answers exactly: every machine holds the weights); once the
   sides see each other again the later one steps down, and the cluster re-forms under the earliest.

Limits: no quorum (a minority side keeps serving, planning with the devices it has); the promotion wait
assumes a successor starts serving within `promote_delay_s` (the store and spec come up in well under a
second: the model is already loaded); a device that never joined any coordinator cannot promote (it was
never told what to serve), so a cold cluster is started by `edgeprism serve`.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta

import torch.distributed as dist

from edgeprism.comm.auth import AuthError
from edgeprism.profile.schema import Profile
from edgeprism.runtime.cluster import launch_engine
from edgeprism.runtime.config import EngineConfig
from edgeprism.runtime.coordinator import PREFIX, ClusterSpec, Device, DeviceOptions, parse_address, read_spec
from edgeprism.runtime.engine import Engine
from edgeprism.runtime.store_filter import parse_allow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Succession:
    """The ordered coordinator addresses and this machine's own place in them. Times in seconds."""

    addresses: tuple[str, ...]
    own: str
    """This machine's entry: where it serves the store when it coordinates."""
    probe_timeout_s: float = 2.0
    """How long one address may take to answer a sweep's probe (connect + sealed spec)."""
    promote_delay_s: float = 2.0
    """Per place in the list: how long a candidate waits before its confirming sweep (> a successor's start)."""
    step_down_check_s: float = 2.0

    def __post_init__(self) -> None:
        for address in self.addresses:
            parse_address(address)
        if len(set(self.addresses)) != len(self.addresses):
            raise ValueError(f"--coordinators {','.join(self.addresses)} names an address twice")
        if self.own not in self.addresses:
            raise ValueError(f"this machine's address {self.own} is not in --coordinators "
                             f"{','.join(self.addresses)}: give --listen one of them (its own)")
        if not (self.probe_timeout_s > 0 and self.promote_delay_s > 0 and self.step_down_check_s > 0):
            raise ValueError(f"probe_timeout_s {self.probe_timeout_s}, promote_delay_s {self.promote_delay_s} and "
                             f"step_down_check_s {self.step_down_check_s} must be > 0")

    @property
    def position(self) -> int:
        return self.addresses.index(self.own)

    @property
    def earlier(self) -> tuple[str, ...]:
        return self.addresses[:self.position]

    @property
    def others(self) -> tuple[str, ...]:
        return tuple(a for a in self.addresses if a != self.own)


def parse_coordinators(text: str) -> tuple[str, ...]:
    """'A:P,B:P,C:P' → the addresses, each checked (ValueError naming the bad one)."""
    addresses = tuple(part.strip() for part in text.split(",") if part.strip())
    if len(addresses) < 2:
        raise ValueError(f"--coordinators {text!r} needs at least two HOST:PORT addresses, comma-separated")
    for address in addresses:
        parse_address(address)
    return addresses


def serving(address: str, secret: bytes | None, timeout_s: float) -> ClusterSpec | None:
    """The spec of this cluster's coordinator at `address`, or None when nothing (of ours) serves there."""
    host, port = parse_address(address)
    try:  # a plain connect first: a refused port answers at once, a TCPStore client would keep retrying
        socket.create_connection((host, port), timeout=timeout_s).close()
        store = dist.TCPStore(host, port, None, False, timedelta(seconds=timeout_s))
        return read_spec(dist.PrefixStore(PREFIX, store), secret, timeout_s, tries=1)
    except AuthError:
        log.warning("%s serves a store whose spec is not sealed with this cluster's secret: not ours", address)
        return None
    except (OSError, RuntimeError, ValueError):  # refused, unreachable, timed out, no spec
        return None


def sweep(addresses: tuple[str, ...], secret: bytes | None, timeout_s: float) -> tuple[str, ClusterSpec] | None:
    """The first of `addresses` that serves this cluster, with its spec."""
    for address in addresses:
        spec = serving(address, secret, timeout_s)
        if spec is not None:
            return address, spec
    return None


class Successor:
    """A machine of the succession: a device of whoever coordinates, which takes over when its turn comes.
    `run()` blocks until the user stops the service this machine coordinates; `serve(engine, spec, stop)` is
    called once promoted and runs the service (the CLI: the HTTP API) until `stop` is set (step down: the
    walk goes on) or the user stops it (`run()` returns); `leave()` from another thread as `Device.leave`.
    `spec`: what to coordinate before any coordinator was joined (`edgeprism serve --coordinators`)."""

    def __init__(self, succession: Succession, options: DeviceOptions, secret: bytes | None,
                 secret_file: str | os.PathLike | None, serve: Callable[[Engine, ClusterSpec, threading.Event], None],
                 link=None, on_event: Callable[[str], None] = lambda text: None, spec: ClusterSpec | None = None,
                 link_file: str | None = None) -> None:
        self.succession, self.secret, self.secret_file, self.serve = succession, secret, secret_file, serve
        self.link_file = link_file
        """The emulated link file a promoted coordinator follows (the testbed), as its devices do."""
        self.on_event = on_event
        options = replace(options, retry=False, coordinators=succession.addresses,
                          bind_addr=options.bind_addr or parse_address(succession.own)[0])
        self.device = Device(options, secret, link=link, on_event=on_event)
        self.device.spec = spec

    def leave(self) -> bool:
        return self.device.leave()

    def run(self) -> None:
        succession = self.succession
        waiting = False
        while True:
            found = sweep(succession.others, self.secret, succession.probe_timeout_s)
            if found is None and self.device.spec is not None:
                time.sleep(succession.position * succession.promote_delay_s)
                found = sweep(succession.others, self.secret, succession.probe_timeout_s)
                if found is None:
                    if not self._coordinate(self.device.spec):
                        return
                    continue
            if found is None:  # never a member: it cannot take over what it was never told
                if not waiting:
                    self.on_event(f"no coordinator serves at {','.join(succession.others)} yet; looking every "
                                  f"{succession.promote_delay_s:.0f} s")
                waiting = True
                time.sleep(succession.promote_delay_s)
                continue
            waiting = False
            address, _ = found
            self.on_event(f"{address} coordinates the cluster; joining it")
            self.device.connect_to(address)
            self.device.run()  # returns when that coordinator is lost or ends the session

    def _coordinate(self, spec: ClusterSpec) -> bool:
        """Serve as the coordinator until an earlier address serves (step down: True) or the user stops the
        service (False)."""
        succession = self.succession
        host, port = parse_address(succession.own)
        self.on_event(f"no earlier coordinator answers: coordinating the cluster at {succession.own} "
                      f"({spec.model}, world size {spec.world_size})")
        model = self.device.model
        engine = launch_engine(spec.world_size, spec.model, Profile.from_dict(spec.profile),
                               checkpoint=self.device.options.checkpoint, seed=spec.seed,
                               config=EngineConfig(**spec.config), timeout_s=spec.timeout_s, bind_addr=host,
                               port=port, secret_file=self.secret_file, local_workers=False, model_obj=model,
                               link_file=self.link_file,
                               coordinators=succession.addresses, service=spec.service,
                               store_allow=parse_allow(str((spec.service or {}).get("store_allow") or "")))
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch_earlier, args=(stop,), name="edgeprism-step-down", daemon=True)
        watcher.start()
        try:
            self.serve(engine, spec, stop)
        finally:
            stepped_down = stop.is_set()
            stop.set()
            engine.close()
            del engine
            gc.collect()  # the store stops serving with its last reference: no stale spec left to find here
        if stepped_down:
            self.on_event(f"stepped down at {succession.own}: an earlier coordinator serves")
        return stepped_down

    def _watch_earlier(self, stop: threading.Event) -> None:
        succession = self.succession
        while not stop.wait(succession.step_down_check_s):
            found = sweep(succession.earlier, self.secret, succession.probe_timeout_s)
            if found is not None:
                log.warning("%s serves the cluster and is earlier in the succession than %s: stepping down",
                            found[0], succession.own)
                stop.set()


__all__ = ["Succession", "Successor", "parse_coordinators", "serving", "sweep"]
