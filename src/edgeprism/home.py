"""Where edgeprism keeps what it builds on a machine: `$EDGEPRISM_HOME`, or `~/.cache/edgeprism`.

The lowest room (docs/ARCHITECTURE.md): it imports nothing of edgeprism, so every room that keeps files
there resolves the folder the same way — the assets cache (`assets.cache_dir`) and the calibrated codecs'
state files (`compress.calibrated_state.calibration_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "EDGEPRISM_HOME"


def home_dir() -> Path:
    """`$EDGEPRISM_HOME` (with `~` expanded) when set and not empty, else `~/.cache/edgeprism` (not created here)."""
    home = os.environ.get(HOME_ENV)
    return Path(home).expanduser() if home else Path.home() / ".cache" / "edgeprism"


__all__ = ["HOME_ENV", "home_dir"]
