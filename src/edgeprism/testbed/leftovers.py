"""What testbeds exist on this machine, and removing what killed runs left behind (`edgeprism testbed status`
and `testbed down --all`).

Works from the state files of `registry` (one per live testbed, written before any namespace or CPU group is
made) and what the kernel shows: `ep-` namespaces (`netns`) and CPU groups (`cpu`). A testbed whose owning
process is gone is stale; a namespace or CPU group that no state file names belongs to a run whose files
were deleted by hand. One testbed's own lifecycle is `net.Testbed`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from edgeprism.testbed import cpu
from edgeprism.testbed.net import Testbed
from edgeprism.testbed.netns import delete_netns, netns_age_s, netns_list, netns_pids
from edgeprism.testbed.registry import PREFIX, pid_alive, read_states, state_dir


def status() -> dict[str, Any]:
    """What exists now: testbeds with state files, and any ep- namespaces (with their process ids)."""
    namespaces = {ns: netns_pids(ns) for ns in netns_list() if ns.startswith(PREFIX)}
    testbeds = []
    for state in read_states():
        owner = state.get("owner_pid")
        testbeds.append({
            "tag": state["tag"],
            "backend": state["backend"],
            "subnet": state.get("subnet"),
            "link": state["link"],
            "hosts": [h["address"] for h in state["hosts"]],
            "speeds": [h.get("speed") for h in state["hosts"]],
            "cpu_quotas": [None if not h.get("cgroup") else cpu.read_quota(h["cgroup"]) for h in state["hosts"]],
            "persistent": owner is None,
            "owner_alive": owner is None or pid_alive(owner),
        })
    known = {ns for s in read_states() for ns in s.get("namespaces", [])}
    orphans = sorted(ns for ns in namespaces if ns not in known)
    known_groups = {h.get("cgroup") for s in read_states() for h in s.get("hosts", [])}
    orphan_groups = [g for g in cpu.list_groups(cpu.find_controller(), PREFIX) if g not in known_groups]
    return {"state_dir": state_dir(), "testbeds": testbeds, "namespaces": namespaces, "orphan_namespaces": orphans,
            "orphan_cgroups": orphan_groups}


def cleanup_stale(everything: bool = False) -> list[str]:
    """Remove leftovers of killed runs: testbeds whose owning process is gone and ep- namespaces no
    state file names. `everything=True` also removes live and persistent testbeds. Returns what went."""
    removed: list[str] = []
    known: set[str] = set()
    known_groups: set[str] = set()
    for state in read_states():
        owner = state.get("owner_pid")
        stale = owner is not None and not pid_alive(owner)
        if not (stale or everything):
            known.update(state.get("namespaces", []))
            known_groups.update(h["cgroup"] for h in state.get("hosts", []) if h.get("cgroup"))
            continue
        tb = Testbed.attach(state["tag"])
        tb.down()
        removed.append(f"testbed {state['tag']}")
    # Namespaces with no state file: a state file is written before any namespace, so these belong to
    # a run whose files were deleted by hand. Spare ones younger than a few seconds (being created).
    for ns in netns_list():
        if ns.startswith(PREFIX) and ns not in known and (everything or netns_age_s(ns) > 10.0):
            delete_netns(ns)
            removed.append(f"netns {ns}")
    # CPU groups with no state file (made after the state file, so the same reasoning holds).
    for group in cpu.list_groups(cpu.find_controller(), PREFIX):
        if group not in known_groups and (everything or _age_s(group) > 10.0):
            cpu.remove_group(group)
            removed.append(f"cgroup {group}")
    return removed


def _age_s(path: str) -> float:
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return float("inf")


__all__ = ["cleanup_stale", "status"]
