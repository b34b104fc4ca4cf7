"""Keep strangers off the rendezvous store: a kernel socket filter on its listening socket, and enough
descriptors that idle connections cannot starve rank 0 (`raise_open_files_limit`).

torch's `TCPStore` accepts every connection and has no access control (docs/SECURITY.md). The coordinator
creates the store's listening socket itself (`coordinator.start_store`), so it can attach a classic BPF
program to it (`SO_ATTACH_FILTER`, Linux, no privilege needed) before handing it over: the kernel then
drops every packet — the connection's first SYN included — whose IPv4 source is outside the allowed
networks, and the store never sees the stranger. Accepted connections inherit the filter.

    attach_allow_filter(listener, parse_allow("192.168.1.20,192.168.1.21,10.8.0.0/24"))

The coordinator's own address and 127.0.0.1 are always allowed (rank 0 is a client of its own store).
This is a firewall rule the process brings along, not authentication: a stranger who takes an allowed
address (ARP spoofing on the same WiFi) passes it; join and control messages stay HMAC-sealed anyway.
IPv4 only; Linux only (elsewhere: a ValueError naming the platform).
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import socket
import struct

log = logging.getLogger(__name__)

MAX_NETWORKS = 64
"""Most networks in one filter (a jump offset is one byte: 3 instructions per network)."""
_SO_ATTACH_FILTER = 26
_SKF_NET_OFF = -0x100000  # classic BPF: offsets from the network (IP) header
_LD_W_ABS, _AND_K, _JEQ_K, _RET_K = 0x20, 0x54, 0x15, 0x06


def parse_allow(text: str) -> tuple[ipaddress.IPv4Network, ...]:
    """'ADDR,ADDR/PREFIX,...' → the IPv4 networks (blank: none, i.e. no filter); ValueError naming a bad entry."""
    networks = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            network = ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise ValueError(f"--store-allow entry {part!r} is not an IPv4 address or network (e.g. 192.168.1.20 "
                             f"or 192.168.1.0/24)") from None
        if not isinstance(network, ipaddress.IPv4Network):
            raise ValueError(f"--store-allow entry {part!r} is IPv6: only IPv4 sources can be filtered")
        networks.append(network)
    return tuple(networks)


def filter_program(networks: tuple[ipaddress.IPv4Network, ...]) -> list[tuple[int, int, int, int]]:
    """The classic BPF program (code, jt, jf, k): accept a packet whose IPv4 source is in `networks`, else drop."""
    if not 1 <= len(networks) <= MAX_NETWORKS:
        raise ValueError(f"{len(networks)} allowed networks: give 1..{MAX_NETWORKS}")
    count = len(networks)
    program = []
    for i, network in enumerate(networks):
        program += [(_LD_W_ABS, 0, 0, (_SKF_NET_OFF + 12) & 0xFFFFFFFF),  # A = the IPv4 source address
                    (_AND_K, 0, 0, int(network.netmask)),
                    (_JEQ_K, 3 * (count - i) - 2, 0, int(network.network_address))]  # → accept, else next
    program += [(_RET_K, 0, 0, 0), (_RET_K, 0, 0, 0xFFFFFFFF)]  # drop; accept (the whole packet)
    return program


def attach_allow_filter(sock: socket.socket, networks: tuple[ipaddress.IPv4Network, ...], own_host: str) -> None:
    """Let only packets from `networks`, `own_host` and 127.0.0.1 reach `sock` (an IPv4 TCP listener)."""
    if sock.family != socket.AF_INET:
        raise ValueError(f"--store-allow filters IPv4 only; the store listens on {own_host} (IPv6)")
    if not hasattr(socket, "SO_BINDTODEVICE"):  # a stand-in for "is this Linux": the option is Linux's
        raise ValueError("--store-allow needs Linux (a classic BPF socket filter)")
    own = [ipaddress.ip_network("127.0.0.1/32")]
    try:
        own.append(ipaddress.ip_network(own_host))
    except ValueError:  # a host name, or 0.0.0.0: the filter allows what the user listed and loopback
        pass
    program = filter_program(tuple(dict.fromkeys((*networks, *own))))
    instructions = (ctypes.c_uint8 * (8 * len(program)))()
    for i, (code, jt, jf, k) in enumerate(program):
        struct.pack_into("=HBBI", instructions, 8 * i, code, jt, jf, k)
    fprog = struct.pack("@HP", len(program), ctypes.addressof(instructions))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError as err:
        raise ValueError(f"cannot attach the store's address filter: {err.strerror}") from None


def raise_open_files_limit() -> None:
    """Raise this process's soft limit of open files to its hard limit. The store accepts every connection
    into this process, so with a device's default soft limit (often 1024) a stranger holding ~1000 idle
    connections would leave rank 0 no descriptor for new lanes, HTTP clients or files
    (scripts/store_flood.py --nofile 1024; docs/SECURITY.md). The hard limit is usually far higher."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # Linux's default ceiling (fs.nr_open)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open files limit raised from %d to %d (the store accepts every connection)", soft, target)
        except (ValueError, OSError) as err:
            log.warning("could not raise the open files limit from %d (%s): a flood of connections to the store "
                        "can exhaust this process's descriptors", soft, err)


__all__ = ["MAX_NETWORKS", "attach_allow_filter", "filter_program", "parse_allow", "raise_open_files_limit"]
