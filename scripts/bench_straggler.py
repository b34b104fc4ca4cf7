"""A device slowed mid-run, on the testbed (a printout; root for CPU quotas):

    sudo python scripts/bench_straggler.py [--speeds 0.5,0.5,0.5] [--model vit-base-patch16-224]

Brings up one host per speed over `--link`, profiles (cached like the demo's profile), then serves
`--requests` requests adaptively (`edgeprism.bench.straggler`): before request `--slow-at` host
`--slow-rank`'s quota drops to `--factor` of its speed, before `--restore-at` it is restored. Prints one
line per request (plan, shares, latency, the engine's speed estimate per device) and how many requests
after the slowdown the plan stopped waiting on the device (its share at most half the smallest other
share, or it is out), and after the restore took it back.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
from pathlib import Path

from edgeprism.assets import cache_dir
from edgeprism.bench.straggler import StragglerSpec, straggler_rank
from edgeprism.profile.link import LinkSession
from edgeprism.profile.profiler import ProfileOptions, run_profile
from edgeprism.testbed.presets import get_preset


def _waits_on(row: dict, rank: int) -> bool:
    """The request waited on `rank`: it had a real share, or it stalled and was rerun locally ("fallback": its
    plan was distributed over every device, the slowed one among them, and missed its deadline)."""
    if row.get("fallback"):
        return True
    if rank not in row["ranks"]:
        return False
    counts = dict(zip(row["ranks"], row["token_counts"]))
    others = [n for r, n in counts.items() if r != rank]
    return counts[rank] > min(others) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-base-patch16-224")
    parser.add_argument("--speeds", default="0.5,0.5,0.5")
    parser.add_argument("--link", default="wifi4")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--slow-rank", type=int, default=1)
    parser.add_argument("--slow-at", type=int, default=6)
    parser.add_argument("--restore-at", type=int, default=14)
    parser.add_argument("--factor", type=float, default=0.25)
    parser.add_argument("--codecs", help="plan only with these of the profile's codecs, comma-separated "
                        "(default: any the fidelity budget admits)")
    parser.add_argument("--allow-unmeasured-codecs", action="store_true",
                        help="opt in to codecs of unmeasured fidelity (random weights); labelled in the output")
    args = parser.parse_args()
    speeds = tuple(float(s) for s in args.speeds.split(","))
    link = get_preset(args.link)
    print(f"load average at start: {os.getloadavg()}")
    with LinkSession(len(speeds), link, backend="netns", speeds=speeds, timeout_s=1800) as session, \
            tempfile.TemporaryDirectory(prefix="edgeprism-straggler-") as control:
        tag = "_".join(f"{s:g}" for s in speeds)
        path = cache_dir() / "profiles" / f"{args.model}-w{len(speeds)}-s{tag}-{link.name}-b{args.batch}-netns+tbf.json"
        if not path.exists():
            options = ProfileOptions(model=args.model, world_size=len(speeds), link=link, link_backend="netns",
                                     batches=(args.batch,), evaluate=False)
            report = run_profile(options, session)
            path.parent.mkdir(parents=True, exist_ok=True)
            report.profile.save(path)
        print(f"profile {path}")
        spec = StragglerSpec(model=args.model, profile=str(path), batch=args.batch, requests=args.requests,
                             slow_rank=args.slow_rank, slow_at=args.slow_at, restore_at=args.restore_at,
                             control_dir=control, allow_unmeasured_codecs=args.allow_unmeasured_codecs,
                             codecs=tuple(args.codecs.split(",")) if args.codecs else None)
        print("codecs: " + ("of unmeasured fidelity allowed (opted in: speed only)" if args.allow_unmeasured_codecs
                            else "faithful only (lossless, or measured within the budget)"))
        result: list = []
        thread = threading.Thread(target=lambda: result.append(session.run(straggler_rank, {"spec": spec.to_json()},
                                                                           dist_backend="gloo")), daemon=True)
        thread.start()
        done = set()
        while thread.is_alive():
            for name, speed in (("slow", speeds[args.slow_rank] * args.factor), ("restore", speeds[args.slow_rank])):
                if name not in done and Path(control, f"{name}.request").exists():
                    session.testbed.set_speed(args.slow_rank, speed)
                    done.add(name)
                    Path(control, f"{name}.ack").write_text("ok")
            thread.join(0.1)
    rows = result[0] if result else []
    for row in rows:
        scales = " ".join(f"{s:.2f}" for s in row["speed_scale"])
        print(f"{row['request']:>3} {row['phase']:<9} {row['latency_s'] * 1e3:8.1f} ms  ranks {row['ranks']} "
              f"tokens {row['token_counts']} {row['codec']}  scales {scales}"
              + ("  (stalled, rerun on rank 0)" if row.get("fallback") else ""))
    slowed = [r for r in rows if r["phase"] == "slowed"]
    # counted from the first slowed request that ran on the device (before it, nothing could be seen)
    first = next((i for i, r in enumerate(slowed) if args.slow_rank in r["ranks"] or r.get("fallback")), None)
    after = None if first is None else next(
        (i - first for i, r in enumerate(slowed) if i > first and not _waits_on(r, args.slow_rank)), None)
    restored = [r for r in rows if r["phase"] == "restored"]
    back = next((i for i, r in enumerate(restored) if _waits_on(r, args.slow_rank)), None)
    print(json.dumps({"requests_until_not_waiting": after,
                      "requests_until_taken_back": None if back is None else back + 1,
                      "load_average_end": os.getloadavg()}))


if __name__ == "__main__":
    main()
