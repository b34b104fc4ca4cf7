"""`--model`: a preset name or a local checkpoint folder, the same in every command (docs/MODELS.md)."""

from __future__ import annotations

import argparse

from edgeprism.models.loading import resolve_model

MODEL_HELP = ("a preset name (e.g. vit-base-patch16-224, bert-tiny-test) or a local checkpoint folder "
              "(config.json + model.safetensors, with its tokenizer/preprocessor files; docs/MODELS.md)")
CHECKPOINT_HELP = "weights for a preset: a local Hugging Face checkpoint folder (default: seeded random weights)"


def resolve_model_argument(args: argparse.Namespace) -> None:
    """In every command that has `--checkpoint`, a folder given as `--model` becomes (its model's name,
    --checkpoint FOLDER), checked here before any worker starts: an unsupported architecture is one
    ValueError naming its model_type and the supported families."""
    if isinstance(getattr(args, "model", None), str) and hasattr(args, "checkpoint"):
        args.model, args.checkpoint = resolve_model(args.model, args.checkpoint)


__all__ = ["CHECKPOINT_HELP", "MODEL_HELP", "resolve_model_argument"]
