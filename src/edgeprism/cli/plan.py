"""`edgeprism plan`: the candidates for one request, their predictions, the excluded codecs, the winner."""

from __future__ import annotations

import argparse
import json
import sys

from edgeprism.cli.budget import add_budget_arguments
from edgeprism.plan import OBJECTIVES, Limits, LinkEstimate, Request, choose_plan, codec_exclusion, enumerate_candidates
from edgeprism.plan.micro import with_micro_batches
from edgeprism.profile.schema import Profile
from edgeprism.runtime.config import EngineConfig

SERVED = EngineConfig()
"""How the engine runs a plan by default (overlap, micro-batches): what `edgeprism plan` predicts for."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan", help="show what the planner would do for a request, and why",
        description="Print every candidate plan for one request with its predicted latency and energy, "
                    "the codecs excluded and why, and the winner.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", metavar="FILE", help="profile JSON written by `edgeprism profile`")
    source.add_argument("--synthetic", metavar="MODEL",
                        help="use a synthetic profile for MODEL (a preset or a checkpoint folder) instead "
                             "(realistic numbers, not measured)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="expected world size (checked against the profile; with --synthetic: its size, default 2)")
    parser.add_argument("--batch", type=int, default=1, help="rows in the request (default 1)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tokens", type=int, default=None, help="tokens per row (text models; ViT: patches + 1)")
    size.add_argument("--image-size", type=int, default=None, help="image side in pixels (ViT models)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="latency")
    add_budget_arguments(parser)
    parser.add_argument("--max-latency-s", type=float, default=None, help="latency ceiling in seconds")
    parser.add_argument("--bandwidth-bps", type=float, default=None,
                        help="live link bandwidth in bits/s (default: the profiled one)")
    parser.add_argument("--latency-s", type=float, default=None,
                        help="live per-message link latency in seconds (default: the profiled one)")
    parser.add_argument("--healthy-ranks", default=None, metavar="R,R,...",
                        help="ranks that are up (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(handler=run)
    return parser


def _load_profile(args: argparse.Namespace) -> Profile:
    if args.synthetic:
        from edgeprism.models.loading import model_config
        from edgeprism.plan.synthetic import synthetic_profile

        return synthetic_profile(model_config(args.synthetic), world_size=args.world_size or 2)
    return Profile.load(args.profile, expect_world_size=args.world_size)


def _num_tokens(profile: Profile, args: argparse.Namespace) -> int:
    config = profile.model
    if args.tokens is not None:
        return int(args.tokens)
    if config.modality == "image":
        side = args.image_size or config.image_size
        if side % config.patch_size:
            raise ValueError(f"image size {side} is not a multiple of {config.name}'s patch size {config.patch_size}")
        return config.num_tokens(image_size=side)
    if args.image_size is not None:
        raise ValueError(f"{config.name} is a text model: give --tokens, not --image-size")
    raise ValueError(f"{config.name} is a text model: give --tokens N")


def _healthy(text: str | None, world_size: int) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        ranks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--healthy-ranks takes comma-separated rank numbers, got {text!r}") from None
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad:
        raise ValueError(f"--healthy-ranks {bad} are outside world size {world_size}")
    return ranks


def run(args: argparse.Namespace) -> int:
    profile = _load_profile(args)
    request = Request(profile.model.name, args.batch, _num_tokens(profile, args))
    link = with_micro_batches(LinkEstimate(  # costed as the engine serves by default
        args.bandwidth_bps if args.bandwidth_bps is not None else profile.link.bandwidth_bps,
        args.latency_s if args.latency_s is not None else profile.link.latency_s,
        _healthy(args.healthy_ranks, profile.world_size), overlap=SERVED.overlap), SERVED.micro_batches)
    limits = Limits(args.max_fidelity_loss, args.max_latency_s, args.allow_unmeasured_codecs)
    candidates = enumerate_candidates(profile, request, link, args.objective, limits)
    plan = choose_plan(profile, request, link, args.objective, limits)
    excluded_codecs = {c.codec: why for c in profile.codecs if (why := codec_exclusion(c, limits)) is not None}

    if args.json:
        out = {
            "profile": {"model": profile.model.name, "config_hash": profile.config_hash,
                        "world_size": profile.world_size, "profile_hash": profile.profile_hash()},
            "request": {"model_name": request.model_name, "batch": request.batch, "num_tokens": request.num_tokens},
            "objective": args.objective,
            "limits": {"max_fidelity_loss": limits.max_fidelity_loss, "max_latency_s": limits.max_latency_s,
                       "allow_unmeasured_codecs": limits.allow_unmeasured_codecs},
            "link": {"bandwidth_bps": link.bandwidth_bps, "latency_s": link.latency_s,
                     "healthy_ranks": link.healthy_ranks},
            "excluded_codecs": excluded_codecs,
            "candidates": [c.to_dict() for c in candidates],
            "plan": plan.to_dict(),
        }
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0

    w = sys.stdout.write
    w(f"{profile}\n")
    w(f"request: {request.model_name} batch={request.batch} tokens={request.num_tokens}; objective {args.objective}; "
      f"link {link.bandwidth_bps / 1e6:g} Mbit/s, {link.latency_s * 1e3:g} ms\n\n")
    header = (f"{'mode':<12} {'ranks':<14} {'codec':<11} {'total ms':>9} {'compute':>8} {'staging':>8} "
              f"{'network':>8} {'latency':>8} {'wire kB':>9} {'energy J':>9}  status\n")
    w(header)
    for cand in candidates:
        p, pred = cand.plan, cand.prediction
        chosen = (p.mode, p.ranks, p.codec) == (plan.mode, plan.ranks, plan.codec)
        status = "WINNER" if chosen else ("" if cand.excluded is None else f"excluded: {cand.excluded}")
        ranks = ",".join(map(str, p.ranks))
        if pred is None:
            w(f"{p.mode:<12} {ranks:<14} {p.codec or '-':<11} {'-':>9} {'':>8} {'':>8} {'':>8} {'':>8} {'':>9} "
              f"{'-':>9}  {status}\n")
            continue
        w(f"{p.mode:<12} {ranks:<14} {p.codec or '-':<11} {pred.total_s * 1e3:>9.1f} {pred.compute_s * 1e3:>8.1f} "
          f"{pred.staging_s * 1e3:>8.1f} {pred.network_s * 1e3:>8.1f} {pred.latency_s * 1e3:>8.1f} "
          f"{pred.wire_bytes / 1e3:>9.1f} {pred.energy_j:>9.2f}  {status}\n")
    if excluded_codecs:
        w("\nexcluded codecs:\n")
        for why in excluded_codecs.values():
            w(f"  {why}\n")
    w(f"\n{plan}\n")
    return 0
