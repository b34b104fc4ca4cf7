"""`edgeprism link-test`: measure what a (testbed) link really delivers, through GLOO collectives.

Brings up a testbed for the given link (or uses a running one with `--testbed TAG`), runs the
link test's rank function on every host through torchrun, and prints the measured latency and bandwidth next
to the preset's figures and how the link was made.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from edgeprism.cli.testbed import add_link_arguments, add_testbed_arguments, host_speeds
from edgeprism.profile.link import run_link_test
from edgeprism.testbed.linktest import LinkMeasurement
from edgeprism.testbed.net import Testbed
from edgeprism.testbed.presets import LinkPreset, format_delay, format_rate, resolve_link


def link_test_row(measurement: LinkMeasurement, link: LinkPreset, testbed: Testbed) -> dict[str, Any]:
    """The JSON row of one link test: measurement, preset figures and how the link was made."""
    return {
        "bandwidth_bps": measurement.bandwidth_bps,
        "allgather_bandwidth_bps": measurement.allgather_bandwidth_bps,
        "latency_s": measurement.latency_s,
        "latency_min_s": measurement.latency_min_s,
        "preset": link.name,
        "preset_rate_bps": link.rate_bps,
        "preset_delay_s": link.delay_s,
        "emulation": testbed.emulation,
        "emulation_detail": measurement.emulation,
        "num_hosts": testbed.num_hosts,
        "bandwidth_ratio": measurement.bandwidth_bps / link.rate_bps,
        "measurement": measurement.to_json(),
    }


def _handler(args: argparse.Namespace) -> int:
    if args.testbed:
        testbed = Testbed.attach(args.testbed)
        if args.link or args.rate is not None or args.delay is not None:
            raise ValueError("--testbed uses that testbed's link; drop --link/--rate/--delay or use `testbed set-link`")
        measurement = run_link_test(testbed, timeout_s=args.timeout_s)
        link = testbed.link
    else:
        link = resolve_link(args.link, args.rate, args.delay)
        hosts, speeds = host_speeds(args)
        with Testbed(hosts, link, cores_per_host=args.cores_per_host, subnet=args.subnet,
                     backend=args.backend, speeds=speeds, medium=args.medium) as testbed:
            measurement = run_link_test(testbed, timeout_s=args.timeout_s)
    row = link_test_row(measurement, link, testbed)
    if args.json:
        print(json.dumps(row))
        return 0
    print(f"link {link}: measured over {testbed.num_hosts} hosts")
    print(f"  emulation:  {testbed.emulation} ({measurement.emulation})")
    if testbed.backend != "netns":
        print(
            "  NOTE: EMULATED on loopback (no root or no ip/tc): rate and delay come from the transport, not the kernel"
        )
    print(
        f"  latency:    {format_delay(measurement.latency_s)} median, {format_delay(measurement.latency_low_s)} lower "
        f"quartile (what a profile uses), {format_delay(measurement.latency_min_s)} min "
        f"(preset {format_delay(link.delay_s)})"
    )
    print(f"  bandwidth:  {format_rate(measurement.bandwidth_bps)} one way "
          f"(preset {format_rate(link.rate_bps)}, ratio {row['bandwidth_ratio']:.3f})")
    print(f"  all-gather: {format_rate(measurement.allgather_bandwidth_bps)} per rank, every link busy both ways")
    print(f"  burst:      {measurement.burst_bytes / 1024:.1f} KiB at line rate after an idle gap (token bucket)")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("link-test", help="measure a link's latency and bandwidth through GLOO")
    add_link_arguments(parser)
    add_testbed_arguments(parser)
    parser.add_argument("--testbed", metavar="TAG", help="measure a running testbed (from `edgeprism testbed up`)")
    parser.add_argument("--timeout-s", type=float, default=180.0, help="give up (and kill every rank) after this")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_handler)
