"""The `ip`/`tc` side of the testbed: run the commands, list and remove namespaces, build and shape the star.

Everything here is a thin wrapper over iproute2 in the layout `net.Testbed` describes (one namespace per
host, a switch namespace with bridge `br0`, a tbf qdisc on each direction of each device's link). It keeps
no state of its own; `net.Testbed` decides what to build and `registry` remembers it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Literal

from edgeprism.testbed.emulation import burst_bytes

log = logging.getLogger(__name__)

BRIDGE = "br0"


@dataclasses.dataclass(frozen=True)
class Host:
    """One emulated device."""

    index: int
    netns: str | None
    """Network namespace, or None on the loopback fallback."""
    ifname: str
    """The interface GLOO should use, named as seen inside `netns`."""
    address: str
    """This host's own address (inside its namespace); on loopback a 127.0.1.x alias."""
    cores: tuple[int, ...]
    speed: float | None = None
    """CPU quota in cores (0.5 = half a core), or None for the whole of `cores`."""
    cgroup: str | None = None
    """The CPU group that enforces `speed` (`testbed.cpu`), or None when unlimited."""


def run_cmd(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one command, capturing its output; with `check`, a RuntimeError carrying stderr on failure."""
    log.debug("+ %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def netns_list() -> list[str]:
    """Names of every network namespace (empty without `ip`)."""
    if shutil.which("ip") is None:
        return []
    out = run_cmd(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(netns: str) -> list[int]:
    out = run_cmd(["ip", "netns", "pids", netns], check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def kill_netns_processes(netns: str) -> None:
    """SIGTERM, then SIGKILL, every process still inside `netns`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = netns_pids(netns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and netns_pids(netns):
            time.sleep(0.05)


def delete_netns(netns: str) -> None:
    """Kill what runs inside `netns`, then delete it (and with it its interfaces and qdiscs)."""
    kill_netns_processes(netns)
    run_cmd(["ip", "netns", "del", netns], check=False)


def netns_age_s(netns: str) -> float:
    """Seconds since `netns` was made (infinite when that cannot be read)."""
    try:
        return time.time() - os.stat(f"/run/netns/{netns}").st_mtime
    except OSError:
        return float("inf")


def kernel_testbed_missing() -> str | None:
    """Why the kernel testbed cannot be built here, with the fix; None when it can."""
    if os.geteuid() != 0:
        return "not running as root (network namespaces need root; run with sudo)"
    missing = [tool for tool in ("ip", "tc", "taskset") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (install them: apt-get install iproute2 util-linux)"
    return None


def build_star(namespaces: Sequence[str], switch_ns: str, hosts: Sequence[Host], prefixlen: int) -> None:
    """Make `namespaces` (hosts' and the switch's), the bridge in `switch_ns`, and one veth pair per host
    with its address; no shaping yet (`shape`)."""
    for ns in namespaces:
        run_cmd(["ip", "netns", "add", ns])
        run_cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
    run_cmd(["ip", "-n", switch_ns, "link", "add", BRIDGE, "type", "bridge"])
    run_cmd(["ip", "-n", switch_ns, "link", "set", BRIDGE, "up"])
    for host in hosts:
        port = f"h{host.index}"
        run_cmd(["ip", "link", "add", host.ifname, "netns", host.netns, "type", "veth",
                 "peer", "name", port, "netns", switch_ns])
        run_cmd(["ip", "-n", switch_ns, "link", "set", port, "master", BRIDGE])
        run_cmd(["ip", "-n", switch_ns, "link", "set", port, "up"])
        run_cmd(["ip", "-n", host.netns, "addr", "add", f"{host.address}/{prefixlen}", "dev", host.ifname])
        run_cmd(["ip", "-n", host.netns, "link", "set", host.ifname, "up"])


def tbf_args(rate_bps: float) -> list[str]:
    """The `tc qdisc` arguments of a token bucket at `rate_bps`."""
    # Queue: 100 ms of traffic, at least 1 MiB, so TCP bursts are delayed rather than dropped
    # (a drop costs a 200 ms retransmission timeout, far from any WiFi behaviour we emulate).
    limit = max(1 << 20, int(rate_bps / 8 * 0.1))
    return ["tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst_bytes(rate_bps)), "limit", str(limit)]


AIR = "air"
"""The shared medium's one queue: an ifb device in the switch namespace."""
Medium = Literal["switched", "shared"]


def shape(verb: Literal["add", "change"], switch_ns: str, hosts: Sequence[Host], rate_bps: float,
          medium: Medium = "switched") -> None:
    """Add or change the shaping. "switched": a tbf on both directions of every host's link (each device has
    its own full-duplex link to the switch). "shared": one WiFi channel — every frame any host sends into the
    switch is redirected (ingress of its bridge port, `mirred`) through one ifb device, `air`, whose single
    tbf all hosts and both directions share (half-duplex, like one channel; frames then go on to the bridge).
    """
    tbf = tbf_args(rate_bps)
    if medium == "shared":
        if verb == "add":
            run_cmd(["ip", "-n", switch_ns, "link", "add", AIR, "type", "ifb"])
            run_cmd(["ip", "-n", switch_ns, "link", "set", AIR, "up"])
            for host in hosts:
                port = f"h{host.index}"
                run_cmd(["tc", "-n", switch_ns, "qdisc", "add", "dev", port, "handle", "ffff:", "ingress"])
                run_cmd(["tc", "-n", switch_ns, "filter", "add", "dev", port, "parent", "ffff:", "protocol", "all",
                         "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", AIR])
        run_cmd(["tc", "-n", switch_ns, "qdisc", verb, "dev", AIR, "root", "handle", "1:", *tbf])
        return
    for host in hosts:
        # Upload: egress of the device's eth0. Download: egress of its bridge port.
        run_cmd(["tc", "-n", host.netns, "qdisc", verb, "dev", host.ifname, "root", "handle", "1:", *tbf])
        run_cmd(["tc", "-n", switch_ns, "qdisc", verb, "dev", f"h{host.index}", "root", "handle", "1:", *tbf])
