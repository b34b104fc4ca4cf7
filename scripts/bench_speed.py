"""Where a split request's time goes, measured against the cost model (issue 16 items 2, 3, 5; a printout, not a
test): 2 emulated devices of one core (or one per `--speeds` entry, a CPU quota each) over one link preset, per
batch the same requests run on rank 0 alone ("local") and split with the exchange after compute ("plain"),
overlapped with own-key attention ("overlap") and overlapped with 2 micro-batches ("mb2") (and the other variants of
`bench.overlap.VARIANTS`: mb3/mb4/mb8, token chunks chunk2/3/4), interleaved request by request (a new order per
round: bench/order.py).

    python scripts/bench_speed.py                       # ViT-B/16, int8, wifi4, batches 1,8, 3 repeats
    python scripts/bench_speed.py --model dinov2-s14 --codec fp16 --batches 1,8 --repeats 5
    python scripts/bench_speed.py --speeds 0.5,0.5,0.5,0.5 --codec int8,kv50:int8 --variants local,mb2 --batches 8

Prints per variant the median latency with min-max, the paired ratio to "plain" (same round), the cost model's
prediction for that variant (the profile's compute and link; overlap and micro-batches as run) and its error,
and rank 0's per-layer timeline summed over the layers (encode / wait / compute), with the host load before and
after: a busy host (other jobs on these cores) makes every number slower and the ratios noisier.
--profile defaults to ~/.cache/edgeprism/profiles/<model>-w2-<link>-netns+tbf*.json (made by `make assets` /
`edgeprism profile`); without one the prediction columns are empty.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from edgeprism.bench.overlap import VARIANTS, add_overlap_arguments, run_overlap
from edgeprism.models.config import get_config
from edgeprism.models.loading import build_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.partition.ranges import equal_shares, split_tokens
from edgeprism.partition.scatter import scatter_ratio
from edgeprism.plan import LinkEstimate, Request
from edgeprism.plan.planner import static_plan
from edgeprism.profile.schema import Profile


def _profile(args) -> Profile | None:
    if args.profile:
        return Profile.from_json(Path(args.profile).read_text())
    folder = Path.home() / ".cache" / "edgeprism" / "profiles"
    world = f"w{len(args.speeds)}-s{'_'.join(f'{s:g}' for s in args.speeds)}" if args.speeds else "w2"
    found = sorted(folder.glob(f"{args.model}-{world}-{args.link}-netns+tbf*.json"), key=lambda p: len(p.name))
    return Profile.from_json(found[0].read_text()) if found else None


def _predicted_s(profile: Profile | None, model: str, codec: str, batch: int, name: str,
                 scatter: float | None = None) -> float | None:
    """`name`: a variant, or "variant codec" with several codecs; `scatter`: wire over raw bytes of the request's
    scatter (8-bit pixels travel as levels; None: raw)."""
    variant, _, named_codec = name.partition(" ")
    codec = named_codec or codec
    if profile is None or all(c.codec != codec for c in profile.codecs):
        return None
    num_tokens = get_config(model).num_tokens()
    overlap, micro_batches, _chunks = VARIANTS.get(variant, (False, 1, 1))
    link = LinkEstimate(profile.link.bandwidth_bps, profile.link.latency_s, overlap=overlap,
                        micro_batches=micro_batches)
    request = Request(profile.model.name, batch, num_tokens,
                      None if scatter is None else scatter * profile.input_bytes_per_token)  # as Engine.request_of
    if variant == "local":
        return static_plan(profile, request, link, "local").predicted_latency_s
    counts = tuple(r.num_tokens for r in split_tokens(num_tokens, equal_shares(profile.world_size)))  # as run
    return static_plan(profile, request, link, "distributed", codec=codec, token_counts=counts).predicted_latency_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_overlap_arguments(parser, codec="int8", repeats=3)
    parser.add_argument("--variants", default="local,plain,overlap,mb2")
    parser.add_argument("--profile", default="", help="profile JSON for the predictions (default: see above)")
    parser.add_argument("--speeds", default="", help="one emulated device per speed, a CPU quota in cores each "
                        "(root), e.g. 0.5,0.5,0.5,0.5; default: 2 devices of one core")
    args = parser.parse_args()
    args.speeds = [float(s) for s in args.speeds.split(",")] if args.speeds else None
    profile = _profile(args)
    result = run_overlap(args, args.variants.split(","), on_progress=print)
    names = [key[:-len("_median_s")] for key in result["points"][0] if key.endswith("_median_s")]  # as run
    model = build_model(args.model) if profile is not None else None
    for point in result["points"]:
        # the requests run_overlap sent (bench/overlap.py): synthetic 8-bit images, whose scatter travels as levels
        inputs = None if model is None else synthetic_inputs(model.config, point["batch"], seed=point["batch"])
        scatter = None if model is None else scatter_ratio(model, inputs, model.validate_input(inputs))
        for name in names:
            point[f"{name}_predicted_s"] = _predicted_s(profile, args.model, args.codec, point["batch"], name, scatter)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['model']} x{result['world_size']}, codec {result['codec']}, {result['emulation']}; load "
          f"{result['load_avg_before'][0]:.1f} -> {result['load_avg_after'][0]:.1f} on {os.cpu_count()} cores; "
          f"{args.repeats} repeats; profile {'none' if profile is None else profile.link.emulation}")
    width = max(8, *(len(name) for name in names))
    print(f"{'batch':>5} {'variant':>{width}} {'median ms':>10} {'min-max ms':>15} {'/plain':>7} {'pred ms':>8} "
          f"{'err':>6} {'cpu ms':>7} {'main ms':>7}  {'timeline encode/wait/compute ms':>31}")
    for p in result["points"]:
        for name in names:
            times = p[f"{name}_s"]
            median, predicted = p[f"{name}_median_s"], p[f"{name}_predicted_s"]
            ratio = p.get(f"{name}_over_plain_median")
            timeline = p.get(f"{name}_timeline_s")
            print(f"{p['batch']:>5} {name:>{width}} {median * 1e3:>10.1f} "
                  f"{min(times) * 1e3:>7.1f}-{max(times) * 1e3:<7.1f} "
                  f"{'' if ratio is None else f'{ratio:.3f}':>7} "
                  f"{'' if predicted is None else f'{predicted * 1e3:.1f}':>8} "
                  f"{'' if predicted is None else f'{(predicted - median) / median:+.0%}':>6} "
                  f"{p[f'{name}_cpu_s'] * 1e3:>7.1f} {p[f'{name}_main_thread_cpu_s'] * 1e3:>7.1f}  "
                  + ("" if timeline is None else "{:.1f} / {:.1f} / {:.1f}".format(
                      *(timeline[k] * 1e3 for k in ("encode_s", "wait_s", "compute_s")))))


if __name__ == "__main__":
    main()
