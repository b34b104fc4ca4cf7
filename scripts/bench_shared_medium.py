"""The all-gather over P hosts on a switched and on a shared medium, against the cost model (root):

    sudo python scripts/bench_shared_medium.py [--hosts 2,3,4] [--link wifi4] [--out FILE.jsonl]

For each P and medium, brings up P testbed hosts (`Testbed(medium=...)`: "switched" = one full-duplex tbf link
per host; "shared" = every frame through one ifb queue, one channel for all hosts and both directions) and runs
the link test (`edgeprism.testbed.linktest`): a one-way broadcast (the channel's rate, R) and all-gathers of the
same size m over all P hosts. The cost model (`plan.cost`, network term) predicts per all-gather
    switched: 8 (P - 1) m / R,    shared: 8 P (P - 1) m / R    (plus (P - 1) x the latency)
with R the one-way rate measured in the same run. Prints measured / predicted per row; one JSON row each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import warnings

from edgeprism.profile.link import run_link_test
from edgeprism.testbed.net import Testbed
from edgeprism.testbed.presets import get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", default="2,3,4")
    parser.add_argument("--link", default="wifi4")
    parser.add_argument("--media", default="switched,shared")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    link = get_preset(args.link)
    rows = []
    for hosts in (int(h) for h in args.hosts.split(",")):
        for medium in args.media.split(","):
            load = os.getloadavg()[0]
            testbed = Testbed(hosts, link, backend="netns", medium=medium)  # type: ignore[arg-type]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # more hosts than cores: the link test barely computes
                testbed.up()
            with testbed:
                m = run_link_test(testbed, timeout_s=600.0)
            rate_bps = m.bandwidth_bps
            nbytes = m.bandwidth_nbytes
            measured_s = statistics.median(m.allgather_samples_s)
            air = hosts if medium == "shared" else 1
            latency_s = (hosts - 1) * m.latency_low_s
            predicted = {"switched": 8 * (hosts - 1) * nbytes / rate_bps + latency_s,
                         "shared": 8 * hosts * (hosts - 1) * nbytes / rate_bps + latency_s}
            row = {"hosts": hosts, "medium": medium, "link": link.name, "allgather_nbytes_per_rank": nbytes,
                   "one_way_rate_bps": rate_bps, "allgather_s": measured_s,
                   "allgather_samples_s": list(m.allgather_samples_s), "latency_low_s": m.latency_low_s,
                   "predicted_s": predicted[medium], "measured_over_predicted": measured_s / predicted[medium],
                   "predicted_switched_s": predicted["switched"], "predicted_shared_s": predicted["shared"],
                   "air_factor": air, "load_avg_1m_at_start": load, "load_avg_1m_at_end": os.getloadavg()[0],
                   "emulation": testbed.emulation}
            rows.append(row)
            print(f"P={hosts} {medium:<8} m={nbytes / 1e6:.2f} MB R={rate_bps / 1e6:.1f} Mbit/s all-gather "
                  f"{measured_s:.3f} s; model {predicted[medium]:.3f} s (switched {predicted['switched']:.3f}, "
                  f"shared {predicted['shared']:.3f}): measured/model {measured_s / predicted[medium]:.2f} "
                  f"[load {load:.1f}]", flush=True)
            if args.out:
                with open(args.out, "a") as out:
                    out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
