"""Emulated hosts and links on one machine: network namespaces, veth pairs, a bridge, tbf qdiscs.

Topology of a `Testbed` with tag T and N hosts (everything lives in namespaces; nothing is added to
the root namespace, so deleting the namespaces deletes every link and qdisc):

    netns ep-T-h0: lo, eth0 (10.77.x.101/24, tbf egress = the device's upload) ──┐
    netns ep-T-h1: lo, eth0 (10.77.x.102/24, tbf egress)                        ──┤ veth
    ...                                                                          │
    netns ep-T-sw: bridge br0 with ports h0, h1, ... (tbf egress on h<i> = device i's download)

so every device has its own full-duplex link of `rate_bps` each way to a switch, like boards on one
WiFi access point (the shared airtime of real WiFi is not modelled; see docs/TESTBED.md). The
one-way delay is added per message by the transport (`emulation.EmulatedLink`), since this kernel
has no netem. Without root or `ip`/`tc`, the testbed falls back to loopback with the whole link
emulated in the transport, and says so.

This module owns one testbed's lifecycle (up, set_link, set_speed, down, attach); the pieces it uses are
`netns` (the ip/tc commands and the star topology), `subnets` (choosing a free address range) and
`registry` (the state files that let another process find and remove a testbed). What exists on the
machine across testbeds, and removing what killed runs left, is `leftovers`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import socket
import time
import warnings
from collections.abc import Sequence
from typing import Literal

from edgeprism.testbed import cpu
from edgeprism.testbed.emulation import LinkMode, write_link_file
from edgeprism.testbed.netns import (
    Host,
    Medium,
    build_star,
    delete_netns,
    kernel_testbed_missing,
    kill_netns_processes,
    shape,
)
from edgeprism.testbed.presets import LinkPreset
from edgeprism.testbed.registry import PREFIX, link_path, state_dir, state_path, write_state
from edgeprism.testbed.subnets import pick_subnet

# Host, kill_netns_processes, state_dir and PREFIX live in netns/registry; they are re-exported here because
# net is the testbed's public face (launch.py and the CLI import them from here).
__all__ = ["PREFIX", "Host", "Testbed", "kill_netns_processes", "state_dir"]

log = logging.getLogger(__name__)

HOST_IFNAME = "eth0"
RDZV_PORT = 29400
FIRST_HOST_OFFSET = 101
"""Host i gets address network + 101 + i. torchrun's c10d rendezvous orders nodes by their address
*string*; keeping the last octet at three digits (101..199) makes that order the host order."""
MAX_HOSTS = 99
Backend = Literal["auto", "netns", "loopback"]


class Testbed:
    """`num_hosts` emulated devices joined by shaped links; a context manager that always cleans up.

    `backend`: "netns" (kernel testbed, needs root, `ip`, `tc`), "loopback" (everything emulated in
    the transport), or "auto" (netns when possible, else loopback with a warning).
    `subnet`: an IPv4 /24 or larger for the hosts' addresses; None picks a free 10.77.x.0/24.
    `persistent`: keep the testbed when this process exits (`edgeprism testbed up`); otherwise
    `cleanup_stale()` may remove it once this process is gone.
    `speeds`: a CPU quota per host in cores (0.5 = half a core; `testbed.cpu`), enforced by one cgroup per
    host; hosts are packed onto cores so that no core is promised more than 1.0. None: whole cores.
    `medium`: "switched" (each host its own full-duplex link) or "shared" (one channel, `netns.shape`).
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        num_hosts: int,
        link: LinkPreset,
        cores_per_host: int = 1,
        subnet: str | None = None,
        backend: Backend = "auto",
        persistent: bool = False,
        speeds: Sequence[float] | None = None,
        medium: Medium = "switched",
    ) -> None:
        if not 1 <= num_hosts <= MAX_HOSTS:
            raise ValueError(f"num_hosts={num_hosts}; the testbed makes 1 to {MAX_HOSTS} hosts")
        if cores_per_host < 1:
            raise ValueError(f"cores_per_host={cores_per_host}; give each host at least 1 core")
        if backend not in ("auto", "netns", "loopback"):
            raise ValueError(f"backend={backend!r}; choose 'auto', 'netns' or 'loopback'")
        if speeds is not None:
            speeds = tuple(float(v) for v in speeds)
            if len(speeds) != num_hosts:
                raise ValueError(f"{len(speeds)} speeds {list(speeds)} for {num_hosts} hosts: give one per host")
            for v in speeds:
                cpu.check_speed(v)
            if max(speeds) > cores_per_host:
                raise ValueError(f"speed {max(speeds)} cores exceeds the {cores_per_host} core(s) each host is "
                                 "pinned to; raise --cores-per-host")
        if medium not in ("switched", "shared"):
            raise ValueError(f"medium={medium!r}; choose 'switched' or 'shared' (one channel, netns only)")
        self.speeds: tuple[float, ...] | None = speeds
        self.medium: Medium = medium
        self.num_hosts = num_hosts
        self.link = link
        self.cores_per_host = cores_per_host
        self.persistent = persistent
        self.tag = secrets.token_hex(3)
        self._requested_subnet = subnet
        self.subnet: str | None = None
        self.backend: Literal["netns", "loopback"] = self._choose_backend(backend)
        if medium == "shared" and self.backend != "netns":
            raise ValueError("medium='shared' needs the kernel testbed (root, ip, tc): the loopback fallback "
                             "emulates each rank's link in its own transport and has no channel to share")
        self.hosts: list[Host] = []
        self.namespaces: list[str] = []
        self.is_up = False
        self._cpu: cpu.CpuController | None = None
        self.link_file = link_path(self.tag)
        self.state_file = state_path(self.tag)

    # -- construction ------------------------------------------------------------------------

    @staticmethod
    def _choose_backend(backend: Backend) -> Literal["netns", "loopback"]:
        if backend == "loopback":
            return "loopback"
        why = kernel_testbed_missing()
        if why is None:
            return "netns"
        if backend == "netns":
            raise ValueError(f"the kernel testbed cannot be built: {why}; or use backend='loopback'")
        warnings.warn(
            f"kernel testbed unavailable ({why}); falling back to loopback with the link EMULATED in the "
            "transport (token bucket + delay)",
            stacklevel=3,
        )
        return "loopback"

    @property
    def emulation(self) -> str:
        """How the link is made: "netns+tbf" or "loopback-transport"."""
        if self.backend != "netns":
            return "loopback-transport"
        return "netns+tbf" if self.medium == "switched" else "netns+tbf+air"

    @property
    def link_mode(self) -> LinkMode:
        return "kernel" if self.backend == "netns" else "transport"

    @property
    def rdzv_endpoint(self) -> str:
        """host:port of the torchrun rendezvous, on the first host (127.0.0.1 on loopback)."""
        host = self.hosts[0].address if self.backend == "netns" else "127.0.0.1"
        return f"{host}:{self.rdzv_port}"

    def _assign_cores(self) -> list[tuple[int, ...]]:
        available = sorted(os.sched_getaffinity(0))
        if self.speeds is not None and self.cores_per_host == 1:
            return cpu.pack_cores(self.speeds, available)
        needed = self.num_hosts * self.cores_per_host
        if needed > len(available):
            warnings.warn(
                f"{self.num_hosts} hosts x {self.cores_per_host} core(s) need {needed} cores but this machine "
                f"has {len(available)} ({available}); the emulated devices will share cores, so compute "
                "timings are not those of separate devices. Use at most "
                f"{max(1, len(available) // self.cores_per_host)} hosts (or fewer --cores-per-host).",
                stacklevel=3,
            )
        return [
            tuple(available[(i * self.cores_per_host + k) % len(available)] for k in range(self.cores_per_host))
            for i in range(self.num_hosts)
        ]

    def _write_state(self) -> None:
        state = {
            "tag": self.tag,
            "backend": self.backend,
            "subnet": self.subnet,
            "owner_pid": None if self.persistent else os.getpid(),
            "created_s": time.time(),
            "link": self.link.to_json(),
            "link_file": self.link_file,
            "namespaces": self.namespaces,
            "hosts": [dataclasses.asdict(h) for h in self.hosts],
            "rdzv_port": self.rdzv_port,
            "medium": self.medium,
            "cpu_controller": None if self._cpu is None else [self._cpu.root, self._cpu.version],
        }
        write_state(self.state_file, state)

    def up(self) -> Testbed:
        if self.is_up:
            return self
        cores = self._assign_cores()
        speeds = self.speeds or (None,) * self.num_hosts
        if self.speeds is not None:
            self._cpu = cpu.find_controller()
            if self._cpu is None:
                warnings.warn(f"host speeds {list(self.speeds)} NOT enforced: {cpu.quota_missing()}; every host "
                              "gets its whole core(s)", stacklevel=2)
        groups = [None if self._cpu is None else cpu.group_path(self._cpu, f"{PREFIX}{self.tag}-h{i}")
                  for i in range(self.num_hosts)]
        try:
            if self.backend == "netns":
                net = pick_subnet(self._requested_subnet)
                self.subnet = str(net)
                self.rdzv_port = RDZV_PORT
                addresses = [str(net.network_address + FIRST_HOST_OFFSET + i) for i in range(self.num_hosts)]
                self.namespaces = [f"{PREFIX}{self.tag}-h{i}" for i in range(self.num_hosts)] + [self._switch_ns]
                self.hosts = [
                    Host(i, f"{PREFIX}{self.tag}-h{i}", HOST_IFNAME, addresses[i], cores[i], speeds[i], groups[i])
                    for i in range(self.num_hosts)
                ]
                # State first: a run killed half-way leaves a file that names what to remove.
                self._write_state()
                build_star(self.namespaces, self._switch_ns, self.hosts, net.prefixlen)
                shape("add", self._switch_ns, self.hosts, self.link.rate_bps, self.medium)
            else:
                self.rdzv_port = _free_port()
                self.hosts = [
                    Host(i, None, "lo", f"127.0.1.{FIRST_HOST_OFFSET + i}", cores[i], speeds[i], groups[i])
                    for i in range(self.num_hosts)
                ]
                self._write_state()
            self._make_groups()
            write_link_file(self.link_file, self.link, self.link_mode)
        except BaseException:
            self.down()
            raise
        self.is_up = True
        log.info("testbed %s up: %d hosts, %s, %s", self.tag, self.num_hosts, self.link, self.describe())
        return self

    @property
    def _switch_ns(self) -> str:
        return f"{PREFIX}{self.tag}-sw"

    def _make_groups(self) -> None:
        for host in self.hosts:
            if self._cpu is not None and host.cgroup is not None and host.speed is not None:
                cpu.make_group(self._cpu, os.path.basename(host.cgroup), host.speed)

    def command_prefix(self, host: Host) -> list[str]:
        """What runs a command on `host`: into its CPU group (if it has a quota), into its namespace (netns
        testbed), pinned to its cores. Every process a host starts goes through this."""
        enter = cpu.enter_prefix(host.cgroup) if host.cgroup is not None else []
        netns = ["ip", "netns", "exec", host.netns] if host.netns is not None else []
        return [*enter, *netns, "taskset", "-c", ",".join(str(c) for c in host.cores)]

    def set_speed(self, index: int, speed: float) -> None:
        """Change host `index`'s CPU quota while jobs run (a straggler: lower it; restored: raise it)."""
        if not 0 <= index < self.num_hosts:
            raise ValueError(f"host {index}: this testbed has hosts 0..{self.num_hosts - 1}")
        host = self.hosts[index]
        if self._cpu is None or host.cgroup is None:
            raise ValueError(f"host {index} has no CPU group (testbed made without --speeds, or {cpu.quota_missing()})")
        if speed > len(host.cores):
            raise ValueError(f"speed {speed} exceeds host {index}'s {len(host.cores)} core(s)")
        cpu.set_quota(self._cpu, host.cgroup, speed)
        self.hosts[index] = dataclasses.replace(host, speed=speed)
        self.speeds = tuple(h.speed or float(len(h.cores)) for h in self.hosts)
        self._write_state()
        log.info("testbed %s host %d speed %.3g -> %.3g cores", self.tag, index, host.speed, speed)

    # -- live changes and teardown -------------------------------------------------------------

    def set_link(self, link: LinkPreset) -> None:
        """Change the link while jobs run: tc change on every qdisc, then rewrite the link file."""
        if not self.is_up:
            raise RuntimeError("set_link on a testbed that is not up")
        old, self.link = self.link, link
        try:
            if self.backend == "netns":
                shape("change", self._switch_ns, self.hosts, link.rate_bps, self.medium)
            write_link_file(self.link_file, link, self.link_mode)
            self._write_state()
        except BaseException:
            self.link = old
            raise
        log.info("testbed %s link changed: %s -> %s", self.tag, old, link)

    def down(self) -> None:
        """Remove everything this testbed made (idempotent): processes in its namespaces, the namespaces
        (and with them every veth, bridge and qdisc), the link and state files."""
        for ns in self.namespaces:
            delete_netns(ns)
        for host in self.hosts:
            if host.cgroup is not None:
                cpu.remove_group(host.cgroup)
        for path in (self.link_file, self.state_file):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.is_up = False

    def describe(self) -> str:
        hosts = ", ".join(f"{h.netns or 'lo'}={h.address} cores {list(h.cores)}"
                          + ("" if h.speed is None else f" speed {h.speed:g}" + ("" if h.cgroup else " (NOT enforced)"))
                          for h in self.hosts)
        if self.backend == "netns":
            how = (f"netns+tbf: kernel tbf {self.link.rate_bps / 1e6:g} Mbit/s each way, transport delay"
                   if self.medium == "switched" else
                   f"netns+tbf+air: ONE shared channel of {self.link.rate_bps / 1e6:g} Mbit/s, transport delay")
        else:
            how = "loopback-transport: rate AND delay EMULATED in the transport (no root / no ip)"
        return f"[{how}] {hosts}"

    def __enter__(self) -> Testbed:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    @classmethod
    def attach(cls, tag: str) -> Testbed:
        """The testbed described by an existing state file (e.g. made by `edgeprism testbed up`)."""
        path = state_path(tag)
        try:
            with open(path) as fh:
                state = json.load(fh)
        except FileNotFoundError:
            raise ValueError(f"no testbed {tag!r} (no {path}); see `edgeprism testbed status`") from None
        tb = cls.__new__(cls)
        tb.num_hosts = len(state["hosts"])
        tb.link = LinkPreset.from_json(state["link"])
        tb.hosts = [Host(**{**h, "cores": tuple(h["cores"])}) for h in state["hosts"]]
        tb.cores_per_host = len(tb.hosts[0].cores) if tb.hosts else 1
        tb.speeds = None if all(h.speed is None for h in tb.hosts) else tuple(
            h.speed or float(len(h.cores)) for h in tb.hosts)
        controller = state.get("cpu_controller")
        tb._cpu = None if controller is None else cpu.CpuController(controller[0], int(controller[1]))
        tb.persistent = state["owner_pid"] is None
        tb.tag = state["tag"]
        tb._requested_subnet = tb.subnet = state["subnet"]
        tb.backend = state["backend"]
        tb.namespaces = state["namespaces"]
        tb.rdzv_port = state["rdzv_port"]
        tb.medium = state.get("medium", "switched")
        tb.link_file = state["link_file"]
        tb.state_file = path
        tb.is_up = True
        return tb


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
