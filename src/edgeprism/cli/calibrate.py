"""`edgeprism calibrate`: fine-tune one of the project's own small models with the codec in the loop."""

from __future__ import annotations

import json
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="fine-tune a small model with the codec in the loop (compression-aware calibration)",
        description="Fine-tune gpt2-shakespeare or vit-fmnist-tiny with the exchange codec in the loop (a "
                    "differentiable single-process emulation of the position-wise split), then measure it "
                    "through the real distributed path on held-out data, before and after. See docs/CALIBRATION.md.")
    p.add_argument("--model", required=True, help="gpt2-shakespeare or vit-fmnist-tiny (trained into the cache "
                                                   "on first use), or a checkpoint folder of the same shape")
    p.add_argument("--codec", required=True, help="codec to calibrate for, e.g. sm16, sm4a, sm4+int8")
    p.add_argument("--world-size", type=int, default=2, help="ranks the split is calibrated for (>= 2)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--params", choices=["full", "light"], default="full",
                   help="full fine-tune, or light: LayerNorm affines and biases only")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-4 full, 5e-3 light)")
    p.add_argument("--batch-size", type=int, help="rows per step (default 8 for GPT-2, 64 for the ViT)")
    p.add_argument("--distill", type=float, default=1.0,
                   help="weight of KL to the uncompressed model's outputs (0 = task loss only; default 1)")
    p.add_argument("--eval-codecs", help="codecs to evaluate before/after (default fp32 and --codec)")
    p.add_argument("--eval-limit", type=int, help="held-out requests (default 64 GPT-2 windows / 2000 images)")
    p.add_argument("--checkpoint", help="start from this checkpoint directory instead of the default weights")
    p.add_argument("--no-before", action="store_true", help="skip the evaluation before calibrating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--out", required=True, help="directory for the calibrated checkpoint (config.json, "
                                                "model.safetensors, CALIBRATION.json)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(handler=handle)


def handle(args) -> int:
    from edgeprism.calibrate.tasks import CALIBRATION_MODELS
    from edgeprism.calibrate.train import CalibrationSettings
    from edgeprism.compress.registry import get_codec, parse_codec_list
    from edgeprism.models.config import get_config, list_presets
    from edgeprism.models.loading import model_config

    if args.model not in list_presets() and args.checkpoint:  # --model FOLDER: calibrate it as its preset's shape
        config = model_config(args.model, args.checkpoint)
        same = [name for name in CALIBRATION_MODELS if get_config(name).config_hash() == config.config_hash()]
        if not same:
            raise ValueError(f"--model {args.checkpoint}: a {config.family} of another shape than "
                             f"{', '.join(CALIBRATION_MODELS)}, whose data calibrate trains on; measure its codecs on "
                             f"your own data with `edgeprism eval --model DIR --data FILE --calibration-fraction 0.3`")
        args.model = same[0]
    get_config(args.model)  # unknown model: the registry's message
    if args.model not in CALIBRATION_MODELS:
        raise ValueError(f"--model {args.model} has no calibration data here; calibrate supports "
                         f"{', '.join(CALIBRATION_MODELS)} (the real pretrained models are evaluated as shipped)")
    get_codec(args.codec)
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be >= 1 (a few hundred is typical)")
    if args.world_size < 2:
        raise ValueError(f"--world-size {args.world_size}: calibrating for a split needs at least 2 ranks")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise ValueError(f"--eval-limit {args.eval_limit} must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads} must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    eval_codecs = [str(c) for c in parse_codec_list(args.eval_codecs)] if args.eval_codecs else None
    batch_size = args.batch_size or (8 if args.model.startswith("gpt2") else 64)
    settings = CalibrationSettings(str(get_codec(args.codec)), args.world_size, args.steps, params=args.params,
                                   lr=args.lr, batch_size=batch_size, distill=args.distill, seed=args.seed)
    from edgeprism.calibrate.runner import run_calibration

    progress = lambda message: print(message, file=sys.stderr, flush=True)
    summary = run_calibration(args.model, settings, out=args.out, eval_codecs=eval_codecs,
                              eval_limit=args.eval_limit, checkpoint=args.checkpoint,
                              evaluate_before=not args.no_before, progress=progress)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=1))
    else:
        print(format_rows(summary["rows"]))
        print(f"calibrated checkpoint: {summary['out']} (use with --checkpoint {summary['out']})")
    return 0


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'weights':<11} {'codec':<10} {'world':>5} {'metric':<15} {'distributed':>11} {'local':>9}"]
    for r in rows:
        lines.append(f"{r['variant']:<11} {r['codec']:<10} {r['world_size']:>5} {r['metric']:<15} "
                     f"{r['value']:>11.4f} {r['local_value']:>9.4f}")
    return "\n".join(lines)
