"""Link profiling, and the place where a profiling run's distributed jobs go.

A `LinkSession` is one group of `world_size` emulated devices for the whole profiling run: testbed
hosts joined by an emulated link when a link is given (`edgeprism.testbed`: netns + tbf as root,
else the loopback fallback with the link emulated in the transport), or plain local workers on
loopback when none is. The link test (`edgeprism.testbed.linktest`) and the validation runs both go
through it, so validation sees exactly the link the profile measured.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgeprism.profile.schema import LinkMeasurement
from edgeprism.testbed.presets import LinkPreset

log = logging.getLogger(__name__)


class LinkSession:
    """`world_size` devices over `link` (None: unshaped loopback) — a context manager that cleans up."""

    def __init__(self, world_size: int, link: LinkPreset | None, backend: str = "auto",
                 cores_per_worker: int = 1, timeout_s: float = 600.0) -> None:
        if world_size < 1:
            raise ValueError(f"--world-size {world_size} must be >= 1")
        if backend not in ("auto", "netns", "loopback"):
            raise ValueError(f"link backend {backend!r}: choose auto, netns or loopback")
        self.world_size = world_size
        self.link = link
        self.backend = backend
        self.cores_per_worker = cores_per_worker
        self.timeout_s = timeout_s
        self.testbed: Any = None

    def __enter__(self) -> LinkSession:
        if self.link is not None:
            from edgeprism.testbed.net import Testbed

            self.testbed = Testbed(self.world_size, self.link, cores_per_host=self.cores_per_worker,
                                   backend=self.backend).up()  # type: ignore[arg-type]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.testbed is not None:
            self.testbed.down()
            self.testbed = None

    @property
    def emulation(self) -> str:
        """How the link is made: "" for a real (here: unshaped loopback) link."""
        if self.testbed is None:
            return ""
        return f"{self.testbed.emulation}: {self.link}"

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Run `python argv...` on every device of the session; raises with rank 0's error on failure."""
        if self.testbed is not None:
            from edgeprism.testbed.launch import run_torchrun

            run_torchrun(self.testbed, list(argv), env=env, timeout_s=self.timeout_s)
        else:
            from edgeprism.comm.launch import launch_local

            launch_local(self.world_size, list(argv), cores_per_worker=self.cores_per_worker,
                         timeout_s=self.timeout_s, env=dict(env or {}))

    def run_following(self, argv: Sequence[str], path: str, on_line: Callable[[str], None],
                      poll_s: float = 0.5) -> None:
        """`run(argv)` while following `path`, a file the job appends lines to: `on_line` gets each
        complete line as it appears (progress), in this thread. Errors of the job are raised here."""
        failure: list[BaseException] = []

        def launch() -> None:
            try:
                self.run(argv)
            except BaseException as err:  # re-raised below, in the caller's thread
                failure.append(err)

        worker = threading.Thread(target=launch, name="edgeprism-session-run", daemon=True)
        worker.start()
        seen = 0
        while True:
            alive = worker.is_alive()
            if os.path.exists(path):
                with open(path) as handle:
                    lines = handle.read().split("\n")[:-1]  # the last piece is incomplete (or empty)
                for line in lines[seen:]:
                    on_line(line)
                seen = len(lines)
            if not alive:
                break
            worker.join(poll_s)
        if failure:
            raise failure[0]

    def measure_link(self) -> tuple[LinkMeasurement, dict[str, Any]]:
        """The link test through the runtime's own collectives → (the profile's link section, raw result)."""
        with tempfile.TemporaryDirectory(prefix="edgeprism-linktest-") as tmp:
            out = os.path.join(tmp, "link.json")
            self.run(["-m", "edgeprism.testbed.linktest_worker", "--out", out])
            raw = json.loads(Path(out).read_text())["link_test"]
        return link_section(raw, self.emulation), raw


def link_section(raw: Mapping[str, Any], emulation: str = "") -> LinkMeasurement:
    """The profile's link from a link test: the per-rank all-gather rate (what every layer's exchange
    gets, with every link busy both ways) and the one-hop latency of a small all-gather."""
    allgather_bps = float(raw["allgather_bandwidth_bps"])
    one_way_bps = float(raw["bandwidth_bps"])
    if not (allgather_bps > 0 and allgather_bps != float("inf")):
        raise ValueError(f"the link test measured no usable all-gather rate ({allgather_bps} bit/s); "
                         "the link is too fast for its sizes — re-run with a slower --link or longer target")
    # The lower quartile, not the median: on a shared host the upper samples hold waits for a busy
    # core (a rank woken late), which the runtime pays as compute skew, not as link latency.
    latency_s = float(raw.get("latency_low_s", float("nan")))
    if not math.isfinite(latency_s):
        latency_s = float(raw["latency_s"])
    burst_bytes = float(raw.get("burst_bytes", 0.0))
    method = (f"edgeprism.testbed.linktest over {raw['world_size']} ranks, GLOO: latency = lower quartile of "
              f"{raw['latency_nbytes']} B all-gathers / {raw['hops']} hop(s) (median "
              f"{float(raw['latency_s']) * 1e3:.3g} ms); bandwidth = per-rank all-gather rate "
              f"at {raw['bandwidth_nbytes']} B ({allgather_bps / 1e6:.2f} Mbit/s; one-way broadcast "
              f"{one_way_bps / 1e6:.2f} Mbit/s); burst = bytes a broadcast after an idle gap sends at line rate "
              f"({burst_bytes / 1024:.1f} KiB)")
    described = raw.get("emulation", "none")
    return LinkMeasurement(latency_s=latency_s, bandwidth_bps=allgather_bps, medium="switched",
                           method=method, emulation=f"{emulation} [{described}]" if emulation else "",
                           burst_bytes=burst_bytes)


__all__ = ["LinkSession", "link_section"]
