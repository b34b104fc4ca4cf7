"""`edgeprism testbed up|down|status|set-link`: a testbed that outlives the command.

`up` makes the hosts and links and leaves them (state in /run/edgeprism, or $TMPDIR without root);
`down` removes one testbed, or with `--all` every testbed and ep- namespace; `status` lists what
exists; `set-link` changes a live testbed's links (tc change + link file) while a job runs.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from edgeprism.testbed.leftovers import cleanup_stale, status
from edgeprism.testbed.net import Testbed
from edgeprism.testbed.presets import LINK_PRESETS, parse_delay, parse_rate, resolve_link

log = logging.getLogger(__name__)


def add_link_arguments(parser: argparse.ArgumentParser, default_preset: str | None = None) -> None:
    """--link/--rate/--delay, shared with `link-test` (and `run --link`)."""
    parser.add_argument(
        "--link",
        default=default_preset,
        metavar="PRESET",
        help=f"link preset: {', '.join(sorted(LINK_PRESETS))}"
        + (f" (default {default_preset})" if default_preset else ""),
    )
    parser.add_argument(
        "--rate", type=parse_rate, metavar="BPS", help="link rate in bit/s (50e6, 50M); overrides the preset"
    )
    parser.add_argument(
        "--delay", type=parse_delay, metavar="S", help="one-way delay in s (0.003, 3ms); overrides the preset"
    )


def parse_speeds(text: str) -> tuple[float, ...]:
    """--speeds 1.0,0.4 → (1.0, 0.4): each host's CPU quota in cores."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--speeds {text!r}: give comma-separated cores, e.g. 1.0,0.4") from None


def add_testbed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hosts", type=int, help="number of emulated devices (default 2, or one per --speeds)")
    parser.add_argument("--cores-per-host", type=int, default=1, help="CPU cores pinned to each device (default 1)")
    parser.add_argument("--speeds", type=parse_speeds, metavar="S0,S1,...",
                        help="CPU quota per host in cores (0.5 = half a core; cgroup cpu controller, root); "
                             "sets --hosts when given alone")
    parser.add_argument("--cpu-quota", type=float, metavar="CORES",
                        help="the same CPU quota for every host (same as --speeds Q,Q,...)")
    parser.add_argument("--subnet", help="private IPv4 range for the hosts (default: a free 10.77.x.0/24)")
    parser.add_argument("--medium", choices=("switched", "shared"), default="switched",
                        help="switched: each host its own full-duplex link (default); shared: one channel for all "
                             "hosts and both directions, like one WiFi channel (netns only)")
    parser.add_argument(
        "--backend", choices=("auto", "netns", "loopback"), default="auto",
        help="netns: kernel-shaped links (root); loopback: all emulated in the transport; auto: netns if possible",
    )


def _print_testbed(tb: Testbed, as_json: bool) -> None:
    if as_json:
        print(json.dumps({
            "tag": tb.tag, "emulation": tb.emulation, "link": tb.link.to_json(), "link_file": tb.link_file,
            "subnet": tb.subnet, "rdzv_endpoint": tb.rdzv_endpoint,
            "hosts": [{"netns": h.netns, "ifname": h.ifname, "address": h.address, "cores": list(h.cores),
                       "speed": h.speed, "cgroup": h.cgroup} for h in tb.hosts],
        }))
        return
    print(f"testbed {tb.tag}: {tb.num_hosts} hosts, link {tb.link}")
    print(
        f"  emulation: {tb.emulation}"
        + ("" if tb.backend == "netns" else "  (EMULATED on loopback: no kernel shaping)")
    )
    print(f"  link file: {tb.link_file}")
    for h in tb.hosts:
        quota = "" if h.speed is None else f"  speed {h.speed:g} core" + (f" ({h.cgroup})" if h.cgroup else
                                                                          " (NOT enforced: no cgroup)")
        print(f"  host {h.index}: netns {h.netns or '-'}  {h.ifname} {h.address}  cores {list(h.cores)}{quota}")
    print(f"remove with: edgeprism testbed down {tb.tag}")


def host_speeds(args: argparse.Namespace) -> tuple[int, tuple[float, ...] | None]:
    """(number of hosts, speeds or None) from --hosts, --speeds and --cpu-quota, checked against each other."""
    speeds = args.speeds
    if args.cpu_quota is not None:
        if speeds is not None:
            raise ValueError(f"--cpu-quota {args.cpu_quota} and --speeds {list(speeds)}: give one of them")
        speeds = (args.cpu_quota,) * (args.hosts or 2)
    hosts = args.hosts or (len(speeds) if speeds is not None else 2)
    if speeds is not None and len(speeds) != hosts:
        raise ValueError(f"--speeds has {len(speeds)} values {list(speeds)} for --hosts {hosts}: give one per host")
    return hosts, speeds


def _up(args: argparse.Namespace) -> int:
    link = resolve_link(args.link, args.rate, args.delay)
    hosts, speeds = host_speeds(args)
    tb = Testbed(hosts, link, cores_per_host=args.cores_per_host, subnet=args.subnet,
                 backend=args.backend, persistent=True, speeds=speeds, medium=args.medium)
    tb.up()
    _print_testbed(tb, args.json)
    return 0


def _down(args: argparse.Namespace) -> int:
    if args.all:
        removed = cleanup_stale(everything=True)
    elif args.tag:
        Testbed.attach(args.tag).down()
        removed = [f"testbed {args.tag}"]
    else:
        removed = cleanup_stale()
    print("\n".join(f"removed {what}" for what in removed) if removed else "nothing to remove")
    return 0


def _status(args: argparse.Namespace) -> int:
    info: dict[str, Any] = status()
    if args.json:
        print(json.dumps(info))
        return 0
    if not info["testbeds"] and not info["namespaces"]:
        print(f"no testbeds (state in {info['state_dir']})")
        return 0
    for tb in info["testbeds"]:
        life = "persistent" if tb["persistent"] else ("running" if tb["owner_alive"] else "STALE (owner gone)")
        link = tb["link"]
        print(f"testbed {tb['tag']}: {tb['backend']}, {len(tb['hosts'])} hosts {tb['hosts']}, "
              f"link {link['name']} {link['rate_bps'] / 1e6:g} Mbit/s {link['delay_s'] * 1e3:g} ms, {life}")
        if any(s is not None for s in tb.get("speeds", [])):
            quotas = [("unlimited" if q is None else f"{q[0] / q[1]:g} core ({q[0]}/{q[1]} us)")
                      for q in tb["cpu_quotas"]]
            print(f"  speeds {tb['speeds']}; cgroup quotas: {', '.join(quotas)}")
    for ns in info["orphan_namespaces"]:
        print(f"orphan namespace {ns} (remove with: edgeprism testbed down)")
    for group in info.get("orphan_cgroups", []):
        print(f"orphan cgroup {group} (remove with: edgeprism testbed down)")
    return 0


def _set_link(args: argparse.Namespace) -> int:
    tb = Testbed.attach(args.tag)
    tb.set_link(resolve_link(args.link, args.rate, args.delay))
    print(f"testbed {tb.tag}: link now {tb.link}")
    return 0


def _set_speed(args: argparse.Namespace) -> int:
    tb = Testbed.attach(args.tag)
    tb.set_speed(args.host, args.speed)
    print(f"testbed {tb.tag}: host {args.host} speed now {args.speed:g} core")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("testbed", help="emulated devices and links on this machine (up/down/status)")
    actions = parser.add_subparsers(dest="testbed_action", metavar="ACTION")
    actions.required = True

    up = actions.add_parser("up", help="make hosts and shaped links, and leave them up")
    add_testbed_arguments(up)
    add_link_arguments(up, default_preset="wifi4")
    up.add_argument("--json", action="store_true")
    up.set_defaults(handler=_up)

    down = actions.add_parser("down", help="remove a testbed (default: the stale ones; --all: everything)")
    down.add_argument("tag", nargs="?", help="testbed tag from `up` or `status`")
    down.add_argument("--all", action="store_true", help="remove every testbed and ep- namespace")
    down.set_defaults(handler=_down)

    st = actions.add_parser("status", help="list testbeds and ep- namespaces")
    st.add_argument("--json", action="store_true")
    st.set_defaults(handler=_status)

    sl = actions.add_parser("set-link", help="change a live testbed's links")
    sl.add_argument("tag")
    add_link_arguments(sl)
    sl.set_defaults(handler=_set_link)

    ss = actions.add_parser("set-speed", help="change one host's CPU quota while jobs run (a straggler)")
    ss.add_argument("tag")
    ss.add_argument("host", type=int, help="host index")
    ss.add_argument("speed", type=float, help="CPU quota in cores (0.5 = half a core)")
    ss.set_defaults(handler=_set_speed)
