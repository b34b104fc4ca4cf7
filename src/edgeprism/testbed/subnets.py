"""Choosing the testbed's IPv4 subnet: one that no root-namespace address or route and no other live
testbed uses."""

from __future__ import annotations

import ipaddress
import json
import shutil

from edgeprism.testbed.netns import run_cmd
from edgeprism.testbed.registry import read_states

DEFAULT_SUBNETS = tuple(f"10.77.{i}.0/24" for i in range(256))


def subnets_in_use() -> dict[str, str]:
    """Subnet -> who uses it: root-namespace addresses and routes, and other live testbeds."""
    used: dict[str, str] = {}
    if shutil.which("ip") is not None:
        for family in ("addr", "route"):
            out = run_cmd(["ip", "-j", family, "show"], check=False).stdout or "[]"
            for entry in json.loads(out):
                if family == "addr":
                    for info in entry.get("addr_info", []):
                        if info.get("family") == "inet":
                            net = ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False)
                            used[str(net)] = f"address {info['local']} on {entry.get('ifname')}"
                elif entry.get("dst", "default") not in ("default",) and ":" not in entry["dst"]:
                    used[str(ipaddress.ip_network(entry["dst"], strict=False))] = f"route {entry['dst']}"
    for state in read_states():
        if state.get("subnet") and state.get("backend") == "netns":
            used[state["subnet"]] = f"testbed {state['tag']}"
    return used


def overlap(subnet: ipaddress.IPv4Network, used: dict[str, str]) -> str | None:
    """The first used subnet that overlaps `subnet`, with who uses it; None when it is free."""
    for other, who in used.items():
        net = ipaddress.ip_network(other, strict=False)
        if net.version == 4 and net.prefixlen > 0 and subnet.overlaps(net):
            return f"{other} ({who})"
    return None


def pick_subnet(requested: str | None) -> ipaddress.IPv4Network:
    """`requested` (a /24 or larger that nothing uses; ValueError otherwise), or the first free
    10.77.x.0/24 when None."""
    used = subnets_in_use()
    if requested is not None:
        try:
            net = ipaddress.IPv4Network(requested, strict=False)
        except ValueError:
            raise ValueError(f"subnet {requested!r} is not an IPv4 network such as 10.77.0.0/24") from None
        if net.prefixlen > 24:
            raise ValueError(f"subnet {net} is smaller than a /24; give e.g. 10.77.0.0/24")
        clash = overlap(net, used)
        if clash is not None:
            raise ValueError(
                f"subnet {net} is already in use by {clash}; pick another private range "
                "(e.g. --subnet 10.78.0.0/24), or omit it to pick a free one"
            )
        return net
    for candidate in DEFAULT_SUBNETS:
        net = ipaddress.IPv4Network(candidate)
        if overlap(net, used) is None:
            return net
    raise RuntimeError("no free subnet in 10.77.0.0/16; run `edgeprism testbed down --all` or pass --subnet")
