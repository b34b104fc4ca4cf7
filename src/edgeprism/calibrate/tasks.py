"""The models calibration knows how to train, with their data: training split for calibration, a disjoint
evaluation set for the distributed path (`evaluate.fidelity`, loopback transport).

- gpt2-shakespeare: calibration windows from the six committed plays (all in the fixture's training
  set); evaluation: held-out per-byte perplexity and next-byte agreement (the decoder budget metric) on
  *Twelfth Night* (never seen), as `edgeprism eval`.
- vit-fmnist-tiny: a tiny ViT trained here from scratch on Fashion-MNIST train (weights to the cache);
  calibration batches from the train split; evaluation: accuracy on the test split.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeprism.evaluate.fidelity import EvalSet, MetricValue, next_token_score
from edgeprism.models.base import Inputs, ReferenceModel

log = logging.getLogger(__name__)

CALIBRATION_MODELS = ("gpt2-shakespeare", "vit-fmnist-tiny")
EOS_ID = 256  # the GPT-2 fixture's text separator (scripts/train_tiny_gpt2.py)
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # Fashion-MNIST train pixel mean/std (of x / 255)
FASHION_VIT_DIRNAME = "vit-fmnist-tiny"


# --- gpt2-shakespeare ---

class ShakespeareTask:
    """Next-byte prediction on random windows of the committed plays (training data of the fixture)."""

    name = "shakespeare-plays"
    head = None

    def __init__(self, context: int = 256) -> None:
        from edgeprism.assets.datasets import GPT2_HELDOUT_PLAY, shakespeare_corpus

        corpus = shakespeare_corpus()
        assert GPT2_HELDOUT_PLAY not in corpus, "calibration text must not contain the held-out play"
        ids: list[int] = []
        for text in corpus.values():
            ids.extend(text.encode("utf-8"))
            ids.append(EOS_ID)
        self.data = torch.tensor(ids, dtype=torch.long)
        self.context = context
        self.plays = tuple(corpus)

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Inputs, Tensor]:
        starts = torch.randint(0, len(self.data) - self.context - 1, (batch_size,), generator=generator)
        windows = torch.stack([self.data[s : s + self.context + 1] for s in starts.tolist()])  # (B, T + 1)
        return {"input_ids": windows[:, :-1]}, windows[:, 1:].reshape(-1)

    def logits(self, model: ReferenceModel, outputs: dict[str, Tensor], head: nn.Module | None) -> Tensor:
        logits = model.logits(outputs["hidden"])  # (B, T, V)
        return logits.reshape(-1, logits.shape[-1])


def load_gpt2_shakespeare() -> ReferenceModel:
    from edgeprism import assets
    from edgeprism.models.loading import load_pretrained

    return load_pretrained(assets.gpt2_shakespeare_dir(), "gpt2-shakespeare")


def gpt2_heldout_set(model: ReferenceModel, limit: int = 64, window: int = 256, batch_size: int = 8) -> EvalSet:
    """Held-out windows scored by next-byte agreement and perplexity, exactly as `evaluate.eval_sets.gpt2_set`
    builds them, for any weights."""
    from edgeprism.assets.datasets import gpt2_heldout_bytes

    data = torch.tensor(list(gpt2_heldout_bytes()), dtype=torch.long)
    windows = data[: (len(data) // window) * window].view(-1, window)[:limit]
    batches = [{"input_ids": windows[s:s + batch_size]} for s in range(0, len(windows), batch_size)]
    return EvalSet("gpt2-heldout", model, batches, next_token_score(model, batches),
                   gather_hidden=True, description=f"{len(windows)} windows of {window} held-out bytes")


# --- vit-fmnist-tiny ---

def fashion_inputs(images) -> Inputs:
    """(N, 28, 28) uint8 numpy → {"pixel_values": (N, 1, 28, 28) float32}, standardised."""
    pixels = torch.from_numpy(images.astype("float32") / 255.0)
    return {"pixel_values": ((pixels - FASHION_MEAN) / FASHION_STD)[:, None]}


class FashionTask:
    """Fashion-MNIST classification from the pooled [CLS] row through a linear `head`."""

    name = "fashion-mnist-train"

    def __init__(self, head: nn.Module, split: str = "train", limit: int | None = None) -> None:
        from edgeprism.assets.datasets import fashion_mnist

        images, labels = fashion_mnist(split, limit=limit)
        self.pixels = fashion_inputs(images)["pixel_values"]
        self.labels = torch.from_numpy(labels.astype("int64"))
        self.head = head

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Inputs, Tensor]:
        index = torch.randint(0, len(self.labels), (batch_size,), generator=generator)
        return {"pixel_values": self.pixels[index]}, self.labels[index]

    def logits(self, model: ReferenceModel, outputs: dict[str, Tensor], head: nn.Module | None) -> Tensor:
        return head(outputs["pooled"])  # (B, 10)


def accuracy_score(head: nn.Module, labels: Tensor):
    """Accuracy of `head` on the pooled rows, distributed (value) against single-device (reference)."""

    def score(reference: list[dict], candidate: list[dict]) -> list[MetricValue]:
        with torch.no_grad():
            ref = head(torch.cat([r["pooled"] for r in reference])).argmax(-1)
            got = head(torch.cat([c["pooled"] for c in candidate])).argmax(-1)
        return [MetricValue("accuracy", float((got == labels).float().mean()), float((ref == labels).float().mean())),
                MetricValue("top1_agreement", float((got == ref).float().mean()), 1.0)]

    return score


def fashion_test_set(model: ReferenceModel, head: nn.Module, limit: int = 2000, batch_size: int = 250) -> EvalSet:
    from edgeprism.assets.datasets import fashion_mnist

    images, labels = fashion_mnist("test", limit=limit)
    pixels = fashion_inputs(images)["pixel_values"]
    batches = [{"pixel_values": pixels[s:s + batch_size]} for s in range(0, len(pixels), batch_size)]
    return EvalSet("fashion-mnist-test", model, batches, accuracy_score(head, torch.from_numpy(labels.astype("int64"))),
                   description=f"{len(pixels)} Fashion-MNIST test images")


def fashion_vit_dir() -> Path:
    from edgeprism.assets import cache_dir

    return cache_dir() / FASHION_VIT_DIRNAME


def train_fashion_vit(steps: int = 500, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                      progress: Callable[[str], None] | None = None) -> tuple[ReferenceModel, nn.Module, dict]:
    """Train vit-fmnist-tiny and its linear head from scratch on Fashion-MNIST train, on one device."""
    from edgeprism.models.loading import build_model

    torch.manual_seed(seed)
    model = build_model("vit-fmnist-tiny", seed=None).train().requires_grad_(True)
    with torch.no_grad():
        model.position_embeddings.normal_(std=0.02)
        model.cls_token.normal_(std=0.02)
    head = nn.Linear(model.config.hidden_size, 10)
    task = FashionTask(head)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.05)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(seed)
    started, recent = time.perf_counter(), []
    for step in range(steps):
        inputs, labels = task.batch(batch_size, generator)
        loss = F.cross_entropy(head(model(inputs)["pooled"]), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        recent.append(float(loss.detach()))
        if progress and (step % 200 == 0 or step == steps - 1):
            progress(f"vit-fmnist-tiny step {step + 1}/{steps} loss {sum(recent[-200:]) / len(recent[-200:]):.4f} "
                     f"({time.perf_counter() - started:.0f} s)")
    model.requires_grad_(False).eval()
    head.requires_grad_(False).eval()
    info = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_time_s": round(time.perf_counter() - started, 1),
        "final_loss_mean200": sum(recent[-200:]) / len(recent[-200:]),
    }
    return model, head, info


def save_head(head: nn.Module, directory: Path) -> None:
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in head.state_dict().items()}, str(Path(directory) / "classifier.safetensors")
    )


def load_fashion_vit(directory: str | Path | None = None) -> tuple[ReferenceModel, nn.Module]:
    """vit-fmnist-tiny and its head from a directory written by `save_checkpoint` + `save_head`."""
    from safetensors.torch import load_file

    from edgeprism.assets import AssetMissingError
    from edgeprism.models.loading import build_model, load_checkpoint

    directory = Path(directory) if directory is not None else fashion_vit_dir()
    if not (directory / "classifier.safetensors").is_file():
        raise AssetMissingError(f"no trained vit-fmnist-tiny in {directory}: train it once with "
                                f"`edgeprism calibrate --model vit-fmnist-tiny ...` (it trains the base model first)")
    model = load_checkpoint(build_model("vit-fmnist-tiny", seed=None), directory)
    head = nn.Linear(model.config.hidden_size, 10)
    head.load_state_dict(load_file(str(directory / "classifier.safetensors")))
    return model, head.requires_grad_(False).eval()


# --- one entry point per model ---

@dataclass
class CalibrationSetup:
    """A model ready to calibrate: weights, head, training task, and the evaluation set for any weights."""

    model: ReferenceModel
    head: nn.Module | None
    task: object
    eval_set: Callable[[ReferenceModel, nn.Module | None], EvalSet]
    source: str


def setup_for(model_name: str, eval_limit: int | None = None, checkpoint: str | Path | None = None,
              base_steps: int = 500, progress: Callable[[str], None] | None = None) -> CalibrationSetup:
    """Load (or, for vit-fmnist-tiny, train once into the cache) the model and its data."""
    if model_name == "gpt2-shakespeare":
        if checkpoint is not None:
            from edgeprism.models.loading import build_model, load_checkpoint

            model = load_checkpoint(build_model(model_name, seed=None), checkpoint)
        else:
            model = load_gpt2_shakespeare()
        return CalibrationSetup(model, None, ShakespeareTask(),
                                lambda m, h: gpt2_heldout_set(m, limit=eval_limit or 64),
                                str(checkpoint or "package data (edgeprism/assets/gpt2-shakespeare)"))
    if model_name == "vit-fmnist-tiny":
        directory = Path(checkpoint) if checkpoint is not None else fashion_vit_dir()
        if checkpoint is None and not (directory / "classifier.safetensors").is_file():
            from edgeprism.calibrate.checkpoint import save_checkpoint

            if progress:
                progress(f"no trained vit-fmnist-tiny in {directory}: training it ({base_steps} steps)")
            model, head, info = train_fashion_vit(steps=base_steps, progress=progress)
            save_checkpoint(model, directory, {"edgeprism_training": info})
            save_head(head, directory)
        model, head = load_fashion_vit(directory)
        return CalibrationSetup(model, head, FashionTask(head),
                                lambda m, h: fashion_test_set(m, h, limit=eval_limit or 2000), str(directory))
    from edgeprism.models.config import get_config

    get_config(model_name)  # unknown names: the registry's own message
    raise ValueError(f"{model_name} has no calibration data here; calibrate supports {', '.join(CALIBRATION_MODELS)} "
                     f"(the real pretrained models are evaluated as shipped)")
