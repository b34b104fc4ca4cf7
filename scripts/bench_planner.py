"""Microseconds per `choose_plan` call on synthetic profiles (a printout, not a test).

    python scripts/bench_planner.py

The planner's budget is < 100 µs per call. The first call on a profile instance derives its tables
(rank order, undominated codecs, cost constants, profile hash); the numbers below are warm calls, the
best of several repeats (a shared machine only ever adds noise).
"""

from __future__ import annotations

import itertools
import timeit

from edgeprism.plan import LinkEstimate, Limits, Request, choose_plan
from edgeprism.plan.synthetic import synthetic_profile


def main() -> None:
    print(f"{'ranks':>5} {'batch':>5} {'objective':>9} {'budget':>6} {'µs/call':>8}  plan")
    for world_size, batch, objective, budget in itertools.product((2, 4, 8), (1, 16), ("latency", "energy"),
                                                                  (None, 0.05)):
        profile = synthetic_profile(world_size=world_size, device_speeds=[1.0 - 0.05 * r for r in range(world_size)])
        request = Request(profile.model.name, batch, 197)
        link = LinkEstimate(profile.link.bandwidth_bps, profile.link.latency_s)
        limits = Limits(max_fidelity_loss=budget, allow_unmeasured_codecs=budget is None)  # None: any codec
        plan = choose_plan(profile, request, link, objective, limits)
        seconds = min(timeit.repeat(lambda: choose_plan(profile, request, link, objective, limits),
                                    number=50, repeat=60)) / 50
        how = "local" if plan.mode == "local" else f"{plan.codec} x{len(plan.ranks)}"
        print(f"{world_size:>5} {batch:>5} {objective:>9} {budget or '-':>6} {seconds * 1e6:>8.1f}  {how}")


if __name__ == "__main__":
    main()
