"""Lint and type checks run with the tests, so CI's one command (`make test`) enforces them.

`ruff check` (the rules in pyproject.toml's [tool.ruff.lint]) over src/ and tests/, and `mypy` over the
packages pyproject.toml's [tool.mypy] names (plan, compress, partition, models, profile). Both tools are
pinned in the `test` extra; each check is also shown to fail on a planted violation, so a passing run
means something. The import layering is checked by tests/test_layering.py.

Why tests rather than three lines in the Makefile: one pytest run reports lint, types and behaviour together
(a lint finding does not hide a failing test, nor the other way round), any way of running the suite — `make
test`, CI, a bare `pytest` — enforces them, and a machine without the tools gets a skip that says how to
install them instead of a shell error.

`ruff format` is configured but not enforced: docs/ARCHITECTURE.md ("Checks that keep it so") says why.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name):
    path = Path(sys.executable).with_name(name)
    if not path.exists() and shutil.which(name) is None:
        pytest.skip(f"{name} is not installed: pip install -e '.[test]' installs the pinned version")
    return str(path) if path.exists() else name


def _run(argv, cwd=ROOT):
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing():
    done = _run([_tool("ruff"), "check", "src", "tests"])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_ruff_catches_a_planted_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f(l):\n    return l\n")  # an unused import and an ambiguous name
    done = _run([_tool("ruff"), "check", "--config", str(ROOT / "pyproject.toml"), str(bad)])
    assert done.returncode == 1 and "F401" in done.stdout and "E741" in done.stdout, done.stdout


def test_mypy_finds_nothing():
    done = _run([_tool("mypy"), "--cache-dir", str(ROOT / ".mypy_cache")])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_mypy_catches_a_planted_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(x: int) -> str:\n    return x\n")
    done = _run([_tool("mypy"), "--config-file", str(ROOT / "pyproject.toml"), "--no-incremental", str(bad)],
                cwd=tmp_path)
    assert done.returncode == 1 and "Incompatible return value" in done.stdout, done.stdout
