"""Two testbed boards for a benchmark script (root): the script reruns itself inside host 0's network namespace
(`rerun_in_host0`), where this process serves as the coordinator and host 1 joins it as a device with
`edgeprism join`, the command of docs/DEPLOY.md, over the kernel-shaped link (`joined_pair`). Used by
scripts/bench_http_batching.py and scripts/bench_llama_ttft.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgeprism.comm.auth import new_secret, write_secret_file
from edgeprism.profile.schema import Profile
from edgeprism.runtime import Engine, EngineConfig, launch_engine
from edgeprism.testbed.net import Testbed
from edgeprism.testbed.presets import get_preset

STORE_PORT = 29400
"""Where the coordinator in host 0 listens for the device (its store), unless told another port."""
HOST0_ARGS = ("ADDR", "DEVICE_NETNS", "SECRET", "CORES")
"""What `rerun_in_host0` appends to the script's `--inner` values, in order: the fields of `Host0`."""


@dataclass(frozen=True)
class Host0:
    """What the script's run inside host 0's namespace is told about the pair (`Host0(*values)`)."""

    address: str
    """Host 0's address on the testbed link: the coordinator binds it."""
    device_netns: str
    secret_file: str
    """The cluster secret both hosts hold."""
    device_cores: str
    """Host 1's cores, comma-separated: the device is pinned to them."""


def rerun_in_host0(script: str, argv: Sequence[str], link: str, inner: Sequence[str] = ()) -> int:
    """Two network-namespace hosts over the `link` preset and a fresh cluster secret, then `script *argv --inner
    *inner ADDR DEVICE_NETNS SECRET CORES` (`HOST0_ARGS`) run in host 0's namespace, pinned to its cores, with the
    link file in EDGEPRISM_LINK_FILE; -> its exit status. The testbed is torn down afterwards."""
    if os.geteuid() != 0:
        raise PermissionError(f"{Path(script).name} needs root (network namespaces, kernel-shaped links)")
    with tempfile.TemporaryDirectory(prefix="edgeprism-pair-") as tmp, \
            Testbed(2, get_preset(link), backend="netns") as tb:
        secret = write_secret_file(Path(tmp) / "cluster.secret", new_secret())
        h0, h1 = tb.hosts
        cmd = ["ip", "netns", "exec", h0.netns, "taskset", "-c", ",".join(map(str, h0.cores)), sys.executable,
               os.path.abspath(script), *argv, "--inner", *inner, h0.address, h1.netns, str(secret),
               ",".join(map(str, h1.cores))]
        return subprocess.run(cmd, env={**os.environ, "EDGEPRISM_LINK_FILE": tb.link_file}).returncode


@contextmanager
def joined_pair(host0: Host0, model: str, profile: Profile, checkpoint: str, config: EngineConfig,
                join_within_s: float, store_port: int = STORE_PORT) -> Iterator[Engine]:
    """Inside host 0 (`rerun_in_host0`): this process as the coordinator, rank 0 of `model` from `checkpoint`, its
    store on `store_port`, and the device joined as rank 1 within `join_within_s` (else RuntimeError); on exit both
    are stopped."""
    engine = launch_engine(2, model, profile, checkpoint=checkpoint, config=config, local_workers=False,
                           bind_addr=host0.address, port=store_port, secret_file=host0.secret_file,
                           link_file=os.environ["EDGEPRISM_LINK_FILE"])
    exe = str(Path(sys.executable).with_name("edgeprism"))
    device = subprocess.Popen(["ip", "netns", "exec", host0.device_netns, "taskset", "-c", host0.device_cores, exe,
                               "join", f"{host0.address}:{store_port}", "--secret-file", host0.secret_file,
                               "--checkpoint", checkpoint, "--quiet"], env=os.environ)
    try:
        deadline = time.monotonic() + join_within_s
        while engine.cluster_status()["members"] != [0, 1]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the device did not join within {join_within_s:.0f} s")
            engine.tick()
            time.sleep(0.2)
        yield engine
    finally:
        engine.close()
        device.terminate()
        device.wait(timeout=30)


__all__ = ["HOST0_ARGS", "STORE_PORT", "Host0", "joined_pair", "rerun_in_host0"]
