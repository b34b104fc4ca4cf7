"""Helpers for tests that start `edgeprism` commands as separate processes (devices joining a coordinator)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeprism.testbed.net import Testbed
from edgeprism.testbed.presets import get_preset

EDGEPRISM = [str(Path(sys.executable).with_name("edgeprism"))]
if not Path(EDGEPRISM[0]).exists():  # not installed as a script: the same entry point
    EDGEPRISM = [sys.executable, "-m", "edgeprism.cli.main"]


def join(address, secret_file, *extra, timeout_s=30, stdout=subprocess.DEVNULL):
    """`edgeprism join ADDRESS --secret-file F ...` as its own process group (stderr kept for the test)."""
    return subprocess.Popen([*EDGEPRISM, "join", address, "--secret-file", str(secret_file), "--timeout",
                             str(timeout_s), *extra], stdout=stdout, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def stop(proc, sig=signal.SIGKILL, timeout_s=20.0):
    """Send `sig` (if it still runs) and wait; kill it if it outlives `timeout_s`. Its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()


def wifi4_testbed(num_hosts, what):
    """A generator for a module fixture: `num_hosts` namespaces over wifi4, taken down afterwards; `what` (the
    test) is skipped with a reason without root or iproute2."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip(f"{what} needs root and iproute2 (network namespaces)")
    tb = Testbed(num_hosts, get_preset("wifi4"), backend="netns").up()
    try:
        yield tb
    finally:
        tb.down()


def maintain_until(engine, done, timeout_s=60.0):
    """Let rank 0 take joins and settle liveness rounds (`engine.maintain()`) until `done()`; fails with the
    cluster's status after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, engine.cluster_status()
        engine.maintain()
        time.sleep(0.05)
