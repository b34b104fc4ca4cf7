"""Reading sysfs attribute files with errors that say what to do.

The reader is a parameter (`ReadText`) of every sysfs meter, and the sysfs root is too, so tests
run the real discovery code against recorded trees in `tests/fixtures/sysfs/` and can inject a
reader that fails the way the kernel does (as root, a chmod 000 file is still readable).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

ReadText = Callable[[Path], str]


def read_text(path: Path) -> str:
    """The default reader: the file's text."""
    return Path(path).read_text()


def read_attr(path: Path, reader: ReadText, hint: str) -> str:
    """One sysfs attribute, stripped. A permission error names the file, the user and `hint`."""
    try:
        return reader(path).strip()
    except PermissionError as error:
        uid = os.geteuid() if hasattr(os, "geteuid") else "?"
        raise PermissionError(f"cannot read {path}: permission denied (running as uid {uid}). {hint}") from error


def read_int(path: Path, reader: ReadText, hint: str) -> int:
    text = read_attr(path, reader, hint)
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path} holds {text!r}; expected an integer") from None


def numbered(paths: list[Path], prefix: str, suffix: str) -> list[tuple[int, Path]]:
    """[(N, path)] for files named prefix+N+suffix, sorted by N (so in10 comes after in9)."""
    out: list[tuple[int, Path]] = []
    for path in paths:
        middle = path.name[len(prefix) : len(path.name) - len(suffix)] if suffix else path.name[len(prefix) :]
        if path.name.startswith(prefix) and path.name.endswith(suffix) and middle.isdigit():
            out.append((int(middle), path))
    return sorted(out)
