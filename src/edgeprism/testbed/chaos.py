"""Seeded faults for a testbed under load: which device fails how, when, and for how long.

`schedule(config, hosts, horizon_s)` is a pure function of its arguments (same seed, same list): events
start at exponential gaps (mean `mean_gap_s`), each on a random device host (never host 0, the
coordinator's) that has no fault active, with a random kind and duration. `ChaosRunner` applies a
schedule to a live `Testbed` on its own thread, undoes every fault when its time is up or on `stop()`
(restore before anything else: the run must end on a healthy testbed), and counts what it applied.

Kinds (docs/RELIABILITY.md, "Chaos under load"):

- `kill`: SIGKILL the device's process, start it again after `duration_s` (callbacks: the testbed does not
  own the processes).
- `cut`: `ip link set eth0 down` inside the host's namespace, `up` after `duration_s` (no reset: the
  peer hangs, as a cut WiFi link).
- `slow`: the host's CPU quota to `slow_speed` cores (`Testbed.set_speed`), back after `duration_s`.
- `sag`: the host's link (both directions' tbf) to its rate / `sag_factor`, back after `duration_s`.
"""

from __future__ import annotations

import logging
import random
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from edgeprism.testbed.net import Testbed
from edgeprism.testbed.netns import shape

EventKind = Literal["kill", "cut", "slow", "sag"]
KINDS: tuple[EventKind, ...] = ("kill", "cut", "slow", "sag")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChaosEvent:
    """One fault: `kind` on testbed host `host`, from `at_s` (seconds after the load started) for `duration_s`."""

    at_s: float
    kind: EventKind
    host: int
    duration_s: float

    def __str__(self) -> str:
        return f"t={self.at_s:7.2f}s {self.kind:<4} host {self.host} for {self.duration_s:.1f}s"


@dataclass(frozen=True)
class ChaosConfig:
    """The fault process. Times in seconds."""

    seed: int = 0
    mean_gap_s: float = 6.0
    """Mean time between two faults' starts (exponential gaps)."""
    min_duration_s: float = 2.0
    max_duration_s: float = 12.0
    kinds: tuple[EventKind, ...] = KINDS
    slow_speed: float = 0.125
    """`slow`: the CPU quota (cores) a slowed device gets."""
    sag_factor: float = 10.0
    """`sag`: the link rate is divided by this."""

    def __post_init__(self) -> None:
        if not (self.mean_gap_s > 0 and 0 < self.min_duration_s <= self.max_duration_s):
            raise ValueError(f"mean_gap_s {self.mean_gap_s} must be > 0 and 0 < min_duration_s "
                             f"{self.min_duration_s} <= max_duration_s {self.max_duration_s}")
        unknown = [k for k in self.kinds if k not in KINDS]
        if not self.kinds or unknown:
            raise ValueError(f"kinds {list(self.kinds)}: choose one or more of {', '.join(KINDS)}")
        if not (self.slow_speed > 0 and self.sag_factor >= 1):
            raise ValueError(f"slow_speed {self.slow_speed} must be > 0 and sag_factor {self.sag_factor} >= 1")


def schedule(config: ChaosConfig, hosts: Sequence[int], horizon_s: float) -> list[ChaosEvent]:
    """The faults that start before `horizon_s` on `hosts` (device hosts, not the coordinator's); one fault
    per host at a time. Deterministic in `config.seed`."""
    if not hosts:
        raise ValueError("no device hosts to fail: the chaos run needs at least one device besides host 0")
    rng = random.Random(config.seed)
    free_at = dict.fromkeys(hosts, 0.0)
    events = []
    at = 0.0
    while True:
        at += rng.expovariate(1.0 / config.mean_gap_s)
        if at >= horizon_s:
            return events
        kind = rng.choice(config.kinds)
        duration = rng.uniform(config.min_duration_s, config.max_duration_s)
        candidates = [h for h in hosts if free_at[h] <= at]
        host = rng.choice(sorted(hosts))  # drawn even when busy, so one busy host does not shift the others' draws
        if host not in candidates:
            continue
        free_at[host] = at + duration
        events.append(ChaosEvent(round(at, 3), kind, host, round(duration, 3)))


class ChaosRunner:
    """Applies a schedule to a live testbed on a daemon thread. `kill(host)` / `restart(host)` stop and start
    the device process of a host. `start()` sets time zero; `stop()` ends the faults still active (in
    order of their starts) and joins the thread."""

    def __init__(self, testbed: Testbed, events: Sequence[ChaosEvent], config: ChaosConfig,
                 kill: Callable[[int], None], restart: Callable[[int], None]) -> None:
        self.testbed, self.config = testbed, config
        self._kill, self._restart = kill, restart
        steps = [(e.at_s, 1, i, e, True) for i, e in enumerate(events)]
        steps += [(e.at_s + e.duration_s, 0, i, e, False) for i, e in enumerate(events)]
        self._steps = sorted(steps, key=lambda s: s[:3])  # at the same time, undo before apply
        self._speeds = {h.index: h.speed for h in testbed.hosts}
        self._active: dict[int, ChaosEvent] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.applied: Counter[str] = Counter()
        self.log: list[str] = []
        self.errors: list[str] = []
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="edgeprism-chaos", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for index in sorted(self._active, key=lambda i: self._active[i].at_s):
            self._step(self._active[index], apply=False)
        self._active.clear()

    def _run(self) -> None:
        for at, _, index, event, apply in self._steps:
            if self._stop.wait(max(0.0, self._t0 + at - time.monotonic())):
                return
            if apply:
                self._active[index] = event
            elif self._active.pop(index, None) is None:
                continue
            self._step(event, apply)

    def _step(self, event: ChaosEvent, apply: bool) -> None:
        host = self.testbed.hosts[event.host]
        what = f"{'apply' if apply else 'undo '} {event}"
        self.log.append(f"{time.monotonic() - self._t0:8.2f}s {what}")
        log.info("chaos: %s", what)
        try:
            if event.kind == "kill":
                (self._kill if apply else self._restart)(event.host)
            elif event.kind == "cut":
                subprocess.run(["ip", "-n", str(host.netns), "link", "set", host.ifname, "down" if apply else "up"],
                               check=True, capture_output=True, timeout=30)
            elif event.kind == "slow":
                speed = self._speeds[event.host] or float(len(host.cores))
                self.testbed.set_speed(event.host, self.config.slow_speed if apply else speed)
            else:
                rate = self.testbed.link.rate_bps / (self.config.sag_factor if apply else 1.0)
                shape("change", self.testbed._switch_ns, [host], rate)
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as err:
            # counted, never fatal: the undo of every fault must still run
            self.errors.append(f"{what}: {err}")
            log.warning("chaos: %s failed: %s", what, err)
            return
        if apply:
            self.applied[event.kind] += 1


__all__ = ["KINDS", "ChaosConfig", "ChaosEvent", "ChaosRunner", "EventKind", "schedule"]
