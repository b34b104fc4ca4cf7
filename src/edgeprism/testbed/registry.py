"""The testbed registry: one state file per live testbed, so another process (`edgeprism testbed down`,
`leftovers.cleanup_stale`) can find and remove what a testbed made. A state file is written before any namespace."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

PREFIX = "ep-"
"""Every namespace the testbed makes is called ep-<tag>-..., so leftovers are recognisable."""


def state_dir() -> str:
    """Where testbed state and link files live (so `testbed down` works from another process)."""
    base = "/run/edgeprism" if os.geteuid() == 0 and os.path.isdir("/run") else os.path.join(
        tempfile.gettempdir(), f"edgeprism-{os.getuid()}"
    )
    os.makedirs(base, mode=0o755, exist_ok=True)
    return base


def state_path(tag: str) -> str:
    return os.path.join(state_dir(), f"{PREFIX}{tag}.state.json")


def link_path(tag: str) -> str:
    return os.path.join(state_dir(), f"{PREFIX}{tag}.link.json")


def write_state(path: str, state: dict[str, Any]) -> None:
    """Replace the state file at `path` atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(state, fh, indent=1)
    os.replace(tmp, path)


def read_states() -> list[dict[str, Any]]:
    """Every readable state file, in file-name order (a half-written or unreadable one is skipped)."""
    states = []
    base = state_dir()
    for name in sorted(os.listdir(base)):
        if name.endswith(".state.json"):
            try:
                with open(os.path.join(base, name)) as fh:
                    states.append(json.load(fh))
            except (OSError, json.JSONDecodeError):
                continue
    return states


def pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
