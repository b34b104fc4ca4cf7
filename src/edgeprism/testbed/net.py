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
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from typing import Any, Literal

from edgeprism.testbed.emulation import LinkMode, burst_bytes, write_link_file
from edgeprism.testbed.presets import LinkPreset

__all__ = ["Host", "Testbed", "status", "cleanup_stale", "state_dir", "kill_netns_processes", "PREFIX"]

log = logging.getLogger(__name__)

PREFIX = "ep-"
"""Every namespace the testbed makes is called ep-<tag>-..., so leftovers are recognisable."""
HOST_IFNAME = "eth0"
RDZV_PORT = 29400
FIRST_HOST_OFFSET = 101
"""Host i gets address network + 101 + i. torchrun's c10d rendezvous orders nodes by their address
*string*; keeping the last octet at three digits (101..199) makes that order the host order."""
MAX_HOSTS = 99
DEFAULT_SUBNETS = tuple(f"10.77.{i}.0/24" for i in range(256))
Backend = Literal["auto", "netns", "loopback"]


def state_dir() -> str:
    """Where testbed state and link files live (so `testbed down` works from another process)."""
    base = "/run/edgeprism" if os.geteuid() == 0 and os.path.isdir("/run") else os.path.join(
        tempfile.gettempdir(), f"edgeprism-{os.getuid()}"
    )
    os.makedirs(base, mode=0o755, exist_ok=True)
    return base


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


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    log.debug("+ %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def _netns_list() -> list[str]:
    if shutil.which("ip") is None:
        return []
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(netns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", netns], check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def kill_netns_processes(netns: str) -> None:
    """SIGTERM, then SIGKILL, every process still inside `netns`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _netns_pids(netns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and _netns_pids(netns):
            time.sleep(0.05)


def _delete_netns(netns: str) -> None:
    kill_netns_processes(netns)
    _run(["ip", "netns", "del", netns], check=False)


def _kernel_testbed_missing() -> str | None:
    """Why the kernel testbed cannot be built here, with the fix; None when it can."""
    if os.geteuid() != 0:
        return "not running as root (network namespaces need root; run with sudo)"
    missing = [tool for tool in ("ip", "tc", "taskset") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (install them: apt-get install iproute2 util-linux)"
    return None


def _subnets_in_use() -> dict[str, str]:
    """Subnet -> who uses it: root-namespace addresses and routes, and other live testbeds."""
    used: dict[str, str] = {}
    if shutil.which("ip") is not None:
        for family in ("addr", "route"):
            out = _run(["ip", "-j", family, "show"], check=False).stdout or "[]"
            for entry in json.loads(out):
                if family == "addr":
                    for info in entry.get("addr_info", []):
                        if info.get("family") == "inet":
                            net = ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False)
                            used[str(net)] = f"address {info['local']} on {entry.get('ifname')}"
                elif entry.get("dst", "default") not in ("default",) and ":" not in entry["dst"]:
                    used[str(ipaddress.ip_network(entry["dst"], strict=False))] = f"route {entry['dst']}"
    for state in _read_states():
        if state.get("subnet") and state.get("backend") == "netns":
            used[state["subnet"]] = f"testbed {state['tag']}"
    return used


def _overlap(subnet: ipaddress.IPv4Network, used: dict[str, str]) -> str | None:
    for other, who in used.items():
        net = ipaddress.ip_network(other, strict=False)
        if net.version == 4 and net.prefixlen > 0 and subnet.overlaps(net):
            return f"{other} ({who})"
    return None


def _read_states() -> list[dict[str, Any]]:
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


def _pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Testbed:
    """`num_hosts` emulated devices joined by shaped links; a context manager that always cleans up.

    `backend`: "netns" (kernel testbed, needs root, `ip`, `tc`), "loopback" (everything emulated in
    the transport), or "auto" (netns when possible, else loopback with a warning).
    `subnet`: an IPv4 /24 or larger for the hosts' addresses; None picks a free 10.77.x.0/24.
    `persistent`: keep the testbed when this process exits (`edgeprism testbed up`); otherwise
    `cleanup_stale()` may remove it once this process is gone.
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
    ) -> None:
        if not 1 <= num_hosts <= MAX_HOSTS:
            raise ValueError(f"num_hosts={num_hosts}; the testbed makes 1 to {MAX_HOSTS} hosts")
        if cores_per_host < 1:
            raise ValueError(f"cores_per_host={cores_per_host}; give each host at least 1 core")
        if backend not in ("auto", "netns", "loopback"):
            raise ValueError(f"backend={backend!r}; choose 'auto', 'netns' or 'loopback'")
        self.num_hosts = num_hosts
        self.link = link
        self.cores_per_host = cores_per_host
        self.persistent = persistent
        self.tag = secrets.token_hex(3)
        self._requested_subnet = subnet
        self.subnet: str | None = None
        self.backend: Literal["netns", "loopback"] = self._choose_backend(backend)
        self.hosts: list[Host] = []
        self.namespaces: list[str] = []
        self.is_up = False
        base = state_dir()
        self.link_file = os.path.join(base, f"{PREFIX}{self.tag}.link.json")
        self.state_file = os.path.join(base, f"{PREFIX}{self.tag}.state.json")

    # -- construction ------------------------------------------------------------------------

    @staticmethod
    def _choose_backend(backend: Backend) -> Literal["netns", "loopback"]:
        if backend == "loopback":
            return "loopback"
        why = _kernel_testbed_missing()
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
        return "netns+tbf" if self.backend == "netns" else "loopback-transport"

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

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        used = _subnets_in_use()
        if self._requested_subnet is not None:
            try:
                net = ipaddress.IPv4Network(self._requested_subnet, strict=False)
            except ValueError:
                raise ValueError(f"subnet {self._requested_subnet!r} is not an IPv4 network such as 10.77.0.0/24") from None
            if net.prefixlen > 24:
                raise ValueError(f"subnet {net} is smaller than a /24; give e.g. 10.77.0.0/24")
            clash = _overlap(net, used)
            if clash is not None:
                raise ValueError(
                    f"subnet {net} is already in use by {clash}; pick another private range "
                    "(e.g. --subnet 10.78.0.0/24), or omit it to pick a free one"
                )
            return net
        for candidate in DEFAULT_SUBNETS:
            net = ipaddress.IPv4Network(candidate)
            if _overlap(net, used) is None:
                return net
        raise RuntimeError("no free subnet in 10.77.0.0/16; run `edgeprism testbed down --all` or pass --subnet")

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
        }
        tmp = f"{self.state_file}.tmp"
        with open(tmp, "w") as fh:
            json.dump(state, fh, indent=1)
        os.replace(tmp, self.state_file)

    def up(self) -> "Testbed":
        if self.is_up:
            return self
        cores = self._assign_cores()
        try:
            if self.backend == "netns":
                net = self._pick_subnet()
                self.subnet = str(net)
                self.rdzv_port = RDZV_PORT
                addresses = [str(net.network_address + FIRST_HOST_OFFSET + i) for i in range(self.num_hosts)]
                self.namespaces = [f"{PREFIX}{self.tag}-h{i}" for i in range(self.num_hosts)] + [self._switch_ns]
                self.hosts = [
                    Host(i, f"{PREFIX}{self.tag}-h{i}", HOST_IFNAME, addresses[i], cores[i])
                    for i in range(self.num_hosts)
                ]
                # State first: a run killed half-way leaves a file that names what to remove.
                self._write_state()
                self._build_netns(net.prefixlen)
            else:
                self.rdzv_port = _free_port()
                self.hosts = [
                    Host(i, None, "lo", f"127.0.1.{FIRST_HOST_OFFSET + i}", cores[i]) for i in range(self.num_hosts)
                ]
                self._write_state()
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

    def _build_netns(self, prefixlen: int) -> None:
        sw = self._switch_ns
        for ns in self.namespaces:
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", sw, "link", "set", "br0", "up"])
        for host in self.hosts:
            port = f"h{host.index}"
            _run(["ip", "link", "add", host.ifname, "netns", host.netns, "type", "veth",
                  "peer", "name", port, "netns", sw])
            _run(["ip", "-n", sw, "link", "set", port, "master", "br0"])
            _run(["ip", "-n", sw, "link", "set", port, "up"])
            _run(["ip", "-n", host.netns, "addr", "add", f"{host.address}/{prefixlen}", "dev", host.ifname])
            _run(["ip", "-n", host.netns, "link", "set", host.ifname, "up"])
        self._shape("add")

    def _tbf_args(self) -> list[str]:
        rate_bps = self.link.rate_bps
        # Queue: 100 ms of traffic, at least 1 MiB, so TCP bursts are delayed rather than dropped
        # (a drop costs a 200 ms retransmission timeout, far from any WiFi behaviour we emulate).
        limit = max(1 << 20, int(rate_bps / 8 * 0.1))
        return ["tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst_bytes(rate_bps)), "limit", str(limit)]

    def _shape(self, verb: Literal["add", "change"]) -> None:
        tbf = self._tbf_args()
        for host in self.hosts:
            # Upload: egress of the device's eth0. Download: egress of its bridge port.
            _run(["tc", "-n", host.netns, "qdisc", verb, "dev", host.ifname, "root", "handle", "1:", *tbf])
            _run(["tc", "-n", self._switch_ns, "qdisc", verb, "dev", f"h{host.index}", "root", "handle", "1:", *tbf])

    # -- live changes and teardown -------------------------------------------------------------

    def set_link(self, link: LinkPreset) -> None:
        """Change the link while jobs run: tc change on every qdisc, then rewrite the link file."""
        if not self.is_up:
            raise RuntimeError("set_link on a testbed that is not up")
        old, self.link = self.link, link
        try:
            if self.backend == "netns":
                self._shape("change")
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
            _delete_netns(ns)
        for path in (self.link_file, self.state_file):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.is_up = False

    def describe(self) -> str:
        hosts = ", ".join(f"{h.netns or 'lo'}={h.address} cores {list(h.cores)}" for h in self.hosts)
        if self.backend == "netns":
            how = f"netns+tbf: kernel tbf {self.link.rate_bps / 1e6:g} Mbit/s each way, transport delay"
        else:
            how = "loopback-transport: rate AND delay EMULATED in the transport (no root / no ip)"
        return f"[{how}] {hosts}"

    def __enter__(self) -> "Testbed":
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    @classmethod
    def attach(cls, tag: str) -> "Testbed":
        """The testbed described by an existing state file (e.g. made by `edgeprism testbed up`)."""
        path = os.path.join(state_dir(), f"{PREFIX}{tag}.state.json")
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
        tb.persistent = state["owner_pid"] is None
        tb.tag = state["tag"]
        tb._requested_subnet = tb.subnet = state["subnet"]
        tb.backend = state["backend"]
        tb.namespaces = state["namespaces"]
        tb.rdzv_port = state["rdzv_port"]
        tb.link_file = state["link_file"]
        tb.state_file = path
        tb.is_up = True
        return tb


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def status() -> dict[str, Any]:
    """What exists now: testbeds with state files, and any ep- namespaces (with their process ids)."""
    namespaces = {ns: _netns_pids(ns) for ns in _netns_list() if ns.startswith(PREFIX)}
    testbeds = []
    for state in _read_states():
        owner = state.get("owner_pid")
        testbeds.append({
            "tag": state["tag"],
            "backend": state["backend"],
            "subnet": state.get("subnet"),
            "link": state["link"],
            "hosts": [h["address"] for h in state["hosts"]],
            "persistent": owner is None,
            "owner_alive": owner is None or _pid_alive(owner),
        })
    known = {ns for s in _read_states() for ns in s.get("namespaces", [])}
    orphans = sorted(ns for ns in namespaces if ns not in known)
    return {"state_dir": state_dir(), "testbeds": testbeds, "namespaces": namespaces, "orphan_namespaces": orphans}


def cleanup_stale(everything: bool = False) -> list[str]:
    """Remove leftovers of killed runs: testbeds whose owning process is gone and ep- namespaces no
    state file names. `everything=True` also removes live and persistent testbeds. Returns what went."""
    removed: list[str] = []
    known: set[str] = set()
    for state in _read_states():
        owner = state.get("owner_pid")
        stale = owner is not None and not _pid_alive(owner)
        if not (stale or everything):
            known.update(state.get("namespaces", []))
            continue
        tb = Testbed.attach(state["tag"])
        tb.down()
        removed.append(f"testbed {state['tag']}")
    # Namespaces with no state file: a state file is written before any namespace, so these belong to
    # a run whose files were deleted by hand. Spare ones younger than a few seconds (being created).
    for ns in _netns_list():
        if ns.startswith(PREFIX) and ns not in known and (everything or _netns_age_s(ns) > 10.0):
            _delete_netns(ns)
            removed.append(f"netns {ns}")
    return removed


def _netns_age_s(netns: str) -> float:
    try:
        return time.time() - os.stat(f"/run/netns/{netns}").st_mtime
    except OSError:
        return float("inf")
