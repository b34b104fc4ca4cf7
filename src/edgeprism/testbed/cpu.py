"""CPU quotas for emulated devices: one cgroup per testbed host, so a host can be 0.5 or 0.4 of a core.

A host's *speed* is the CPU time it may use per wall second, in cores (1.0 = one whole core, 0.5 = half
of one). The kernel enforces it with the CFS bandwidth controller:

* cgroup v1 (this machine: the `cpu` controller mounted at /sys/fs/cgroup/cpu): `cpu.cfs_period_us` and
  `cpu.cfs_quota_us` = speed × period;
* cgroup v2 (the unified hierarchy with `cpu` in `cgroup.controllers`): `cpu.max` = "quota period".

The group of a host is `<root>/ep-<tag>-h<i>`; a process enters it by writing its pid to `cgroup.procs`
before it execs the real command (`enter_prefix`), and every child inherits it. The groups are removed
with the testbed (a group can only be removed once empty, so the namespaces' processes go first).

Period: `DEFAULT_PERIOD_US`, chosen from the measurement in docs/TESTBED.md ("CPU quotas"): a short
period spreads a throttled host's run time finely over wall time, so a timed layer sees the quota and
not an on/off pattern of 100 ms.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

V1_ROOT = "/sys/fs/cgroup/cpu"
V2_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
DEFAULT_PERIOD_US = 10_000
"""10 ms: the spread of a timed matmul under a quota was lowest at this period (docs/TESTBED.md)."""
MIN_QUOTA_US = 1_000
"""The kernel refuses a CFS quota under 1 ms."""


@dataclass(frozen=True)
class CpuController:
    """Where CPU groups are made and which interface they speak."""

    root: str
    version: int
    """1: cpu.cfs_quota_us / cpu.cfs_period_us; 2: cpu.max."""


def find_controller() -> CpuController | None:
    """The writable CPU bandwidth controller of this machine, or None (not root, no cgroup fs)."""
    if os.geteuid() != 0:
        return None
    if os.path.exists(os.path.join(V1_ROOT, "cpu.cfs_quota_us")) and os.access(V1_ROOT, os.W_OK):
        return CpuController(V1_ROOT, 1)
    for root in V2_ROOTS:
        try:
            with open(os.path.join(root, "cgroup.controllers")) as fh:
                if "cpu" in fh.read().split() and os.access(root, os.W_OK):
                    return CpuController(root, 2)
        except OSError:
            continue
    return None


def quota_missing() -> str | None:
    """Why host CPU quotas cannot be set here, with the fix; None when they can."""
    if os.geteuid() != 0:
        return "not running as root (cgroups need root; run with sudo)"
    if find_controller() is None:
        return (f"no writable CPU bandwidth controller (neither {V1_ROOT}/cpu.cfs_quota_us nor a cgroup v2 "
                "hierarchy with the cpu controller)")
    return None


def check_speed(speed: float) -> None:
    if not (0.0 < speed <= 64.0):
        raise ValueError(f"device speed {speed} must be a CPU share in cores, > 0 (0.5 = half a core)")


def quota_us(speed: float, period_us: int) -> int:
    """CFS quota of `speed` cores per `period_us`; at least the kernel's 1 ms minimum."""
    check_speed(speed)
    return max(MIN_QUOTA_US, round(speed * period_us))


def group_path(controller: CpuController, name: str) -> str:
    return os.path.join(controller.root, name)


def _write(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def set_quota(controller: CpuController, path: str, speed: float, period_us: int = DEFAULT_PERIOD_US) -> None:
    """Limit the group at `path` to `speed` cores (it may be changed while processes run in it)."""
    quota = quota_us(speed, period_us)
    if controller.version == 1:
        # The kernel checks quota against period at each write; set the period with no quota first.
        _write(os.path.join(path, "cpu.cfs_quota_us"), "-1")
        _write(os.path.join(path, "cpu.cfs_period_us"), str(period_us))
        _write(os.path.join(path, "cpu.cfs_quota_us"), str(quota))
    else:
        _write(os.path.join(path, "cpu.max"), f"{quota} {period_us}")
    log.debug("cgroup %s: %d us per %d us (%.3g cores)", path, quota, period_us, speed)


def make_group(controller: CpuController, name: str, speed: float, period_us: int = DEFAULT_PERIOD_US) -> str:
    """Create (or reuse) the group `name` limited to `speed` cores; returns its path."""
    path = group_path(controller, name)
    os.makedirs(path, exist_ok=True)
    set_quota(controller, path, speed, period_us)
    return path


def read_quota(path: str) -> tuple[int, int] | None:
    """(quota_us, period_us) of a group, or None when unlimited or gone."""
    try:
        if os.path.exists(os.path.join(path, "cpu.max")):
            with open(os.path.join(path, "cpu.max")) as fh:
                quota, period = fh.read().split()
            return None if quota == "max" else (int(quota), int(period))
        with open(os.path.join(path, "cpu.cfs_quota_us")) as fh:
            quota_value = int(fh.read())
        with open(os.path.join(path, "cpu.cfs_period_us")) as fh:
            period_value = int(fh.read())
    except (OSError, ValueError):
        return None
    return None if quota_value < 0 else (quota_value, period_value)


def group_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as fh:
            return [int(tok) for tok in fh.read().split()]
    except OSError:
        return []


def remove_group(path: str, timeout_s: float = 3.0) -> bool:
    """Remove an (emptied) group; processes still in it are killed first. True when it is gone."""
    if not os.path.isdir(path):
        return True
    deadline = time.monotonic() + timeout_s
    for pid in group_pids(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    while True:
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as err:
            if time.monotonic() > deadline:
                log.warning("could not remove cgroup %s: %s (processes: %s)", path, err, group_pids(path))
                return False
            time.sleep(0.05)


def list_groups(controller: CpuController | None, prefix: str) -> list[str]:
    """Paths of the groups under the controller's root whose name starts with `prefix`."""
    if controller is None or not os.path.isdir(controller.root):
        return []
    return sorted(os.path.join(controller.root, name) for name in os.listdir(controller.root)
                  if name.startswith(prefix) and os.path.isdir(os.path.join(controller.root, name)))


def enter_prefix(path: str) -> list[str]:
    """A command prefix that moves the process into the group at `path`, then execs the rest of the
    command line (which inherits the group with all its children)."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', path]


def pack_cores(speeds: Sequence[float], available: Sequence[int]) -> list[tuple[int, ...]]:
    """One core per host, hosts with quotas packed so that the quotas on a core add up to at most 1.0
    where they can (first fit, largest quota first); warns when the cores are oversubscribed."""
    load = dict.fromkeys(available, 0.0)
    chosen: dict[int, int] = {}
    for i in sorted(range(len(speeds)), key=lambda i: (-speeds[i], i)):
        core = min(available, key=lambda c: (load[c] + speeds[i] > 1.0 + 1e-9, load[c], c))
        load[core] += speeds[i]
        chosen[i] = core
    if max(load.values()) > 1.0 + 1e-9:
        warnings.warn(f"host speeds {list(speeds)} add up to {sum(speeds):g} cores but this machine has "
                      f"{len(available)}; the emulated devices will compete for cores, so they run slower than "
                      "their quotas", stacklevel=5)
    return [(chosen[i],) for i in range(len(speeds))]




__all__ = [
    "DEFAULT_PERIOD_US",
    "CpuController",
    "enter_prefix",
    "find_controller",
    "list_groups",
    "make_group",
    "pack_cores",
    "quota_missing",
    "read_quota",
    "remove_group",
    "set_quota",
]
