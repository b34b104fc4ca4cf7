"""`edgeprism run`: one batch, locally or position-wise over N local workers (or testbed hosts)."""

from __future__ import annotations

import argparse
import json
import os

from edgeprism.cli.model_arg import CHECKPOINT_HELP, MODEL_HELP
from edgeprism.comm.launch import JobSession
from edgeprism.runtime.batch import BatchSpec, batch_rank


def _shares(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shares {text!r} must be comma-separated fractions, e.g. 0.5,0.3,0.2"
        ) from None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="run one batch locally or distributed, and report what it cost",
                              description="Run one synthetic batch through a model, locally or split by token "
                                          "position over N workers (each pinned to its own core).")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--world-size", type=int, default=2, help="number of ranks (emulated devices); default 2")
    p.add_argument("--shares", type=_shares, help="token share per rank, summing to 1 (default equal)")
    p.add_argument("--mode", choices=["local", "distributed"], help="default: distributed if world size > 1")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, help="text models: tokens per row (default 64)")
    p.add_argument("--image-size", type=int, help="ViT: image side in pixels (default the model's native size)")
    p.add_argument("--padded", action="store_true", help="text models: right-pad rows to random lengths")
    p.add_argument("--codec", default="fp32", help="what ranks exchange: fp32 (full), fp16, int8, sm4, sm4a+int8 ...")
    p.add_argument("--uniform-weighting", dest="size_aware", action="store_false",
                   help="no log(count) logit bias for received means (default: size-aware, as measured best)")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="decoders (GPT-2, Llama): greedily generate N tokens after the prefill; the last rank decodes "
                        "from its cache; with --compare-local the prefill is compared too")
    p.add_argument("--compare-local", action="store_true", help="also run one device and report max_abs_diff")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cores-per-worker", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before every rank is stopped")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    from edgeprism.cli.testbed import add_link_arguments

    add_link_arguments(p)
    p.add_argument("--backend", choices=("auto", "netns", "loopback"), default="auto",
                   help="with --link: netns (kernel-shaped links, root) or loopback (emulated in the transport)")
    p.set_defaults(handler=handle)


def validate(args) -> BatchSpec:
    """Every user mistake is caught here, before any worker starts."""
    from edgeprism.compress.registry import get_codec
    from edgeprism.models.loading import build_model, load_model
    from edgeprism.models.synthetic import synthetic_inputs
    from edgeprism.partition.ranges import split_tokens, validate_shares

    if args.world_size < 1:
        raise ValueError(f"--world-size {args.world_size} must be >= 1")
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch} must be >= 1")
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats {args.repeats} must be >= 1 and --warmup {args.warmup} >= 0")
    mode = args.mode or ("distributed" if args.world_size > 1 else "local")
    get_codec(args.codec)
    # a preset's architecture alone; with a checkpoint (a folder --model included) its weights are checked too
    model = load_model(args.model, args.checkpoint) if args.checkpoint else build_model(args.model, seed=None)
    config = model.config
    if config.modality == "image" and args.seq_len:
        raise ValueError(f"--seq-len is for text models; {config.name} is a ViT: use --image-size")
    if config.modality != "image" and args.image_size:
        raise ValueError(f"--image-size is for ViT models; {config.name} is a text model: use --seq-len")
    if args.generate < 0:
        raise ValueError(f"--generate {args.generate} must be >= 0")
    if args.generate and not config.causal:
        raise ValueError(f"--generate needs a decoder model; {config.name} is a {config.family} encoder")
    if args.generate and args.padded:
        raise ValueError("--generate needs unpadded prompts; drop --padded")
    if args.generate and num_tokens_for(config, args) + args.generate > config.max_positions:
        raise ValueError(f"{num_tokens_for(config, args)} prompt tokens + --generate {args.generate} exceed "
                         f"{config.name}'s {config.max_positions} positions")
    if args.seq_len is not None and args.seq_len < 1:
        raise ValueError(f"--seq-len {args.seq_len} must be >= 1")
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size {args.image_size} must be >= 1")
    probe = synthetic_inputs(config, 1, seq_len=args.seq_len, image_size=args.image_size, padded=False)
    if config.modality != "image" and args.seq_len is None:
        probe = synthetic_inputs(config, 1, seq_len=None)
    num_tokens = model.validate_input(probe)
    if mode == "distributed":
        shares = validate_shares(args.shares, args.world_size) if args.shares else None
        split_tokens(num_tokens, shares or tuple([1.0 / args.world_size] * args.world_size))
    return BatchSpec(model=args.model, batch=args.batch, world_size=args.world_size if mode == "distributed" else 1,
                     mode=mode, shares=args.shares, codec=args.codec, size_aware=args.size_aware,
                     seq_len=args.seq_len, image_size=args.image_size, padded=args.padded,
                     checkpoint=os.path.abspath(args.checkpoint) if args.checkpoint else None, seed=args.seed,
                     warmup=args.warmup, repeats=args.repeats, compare_local=args.compare_local,
                     generate=args.generate)


def num_tokens_for(config, args) -> int:
    return args.seq_len or min(64, config.max_positions)


def execute(spec: BatchSpec, cores_per_worker: int = 1, timeout_s: float = 300.0, link=None,
            backend: str = "auto") -> dict:
    """Run `spec` on its ranks and return rank 0's result.

    Without `link`: local processes on loopback. With a `LinkPreset`: one testbed host per rank
    (network namespace + kernel-shaped link when root, else loopback with the link emulated in the
    transport), each rank launched by torchrun's multi-node rendezvous (`comm.launch.JobSession`).
    """
    with JobSession(spec.world_size, link, backend=backend, cores_per_worker=cores_per_worker,
                    timeout_s=timeout_s) as session:
        result = session.run(batch_rank, spec.to_dict(), dist_backend=spec.backend, device=spec.device)
        if link is not None:
            result["emulation"] = session.testbed.emulation
            result["preset"] = link.name
    return result


def format_result(result: dict) -> str:
    lines = [f"{result['model']}: {result['mode']} over {result['world_size']} rank(s), batch {result['batch']}, "
             f"{result['num_tokens']} tokens/row" + (f", codec {result['codec']}" if result.get("codec") else ""),
             f"  latency        {result['latency_s'] * 1e3:9.2f} ms (median of {len(result['latencies_s'])})",
             f"  compute        {result['compute_s'] * 1e3:9.2f} ms",
             f"  staging        {result['staging_s'] * 1e3:9.2f} ms",
             f"  collective     {result['collective_s'] * 1e3:9.2f} ms  (link: {result['link']})",
             f"  emulated delay {result['emulated_delay_s'] * 1e3:9.2f} ms  (one-way latency added per message)",
             f"  bytes exchanged {result['bytes_exchanged']:,} B per request (layer exchanges, all ranks)"]
    if "generated_ids" in result:
        lines.append(f"  generated {result['generate']} tokens per row; row 0: {result['generated_ids'][0]}")
        if "generated_match_fraction" in result:
            lines.append(f"  tokens equal to single-device greedy decoding: {result['generated_match_fraction']:.1%}")
    if "max_abs_diff" in result:
        lines.append(f"  max |distributed - single device| = {result['max_abs_diff']:.3g}")
    return "\n".join(lines)


def handle(args) -> int:
    spec = validate(args)
    link = None
    if args.link or args.rate or args.delay:
        from edgeprism.testbed.presets import resolve_link

        link = resolve_link(args.link, args.rate, args.delay)
    result = execute(spec, cores_per_worker=args.cores_per_worker, timeout_s=args.timeout, link=link,
                     backend=args.backend)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0
