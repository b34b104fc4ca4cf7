"""Compression-aware calibration: fine-tune a model with the codec in the loop (`emulate`).

Loss per step: the task's cross-entropy on the emulated distributed outputs, plus (optionally,
`distill` > 0) the KL divergence from the uncompressed model's outputs (a frozen copy of the
starting weights, run on one device) to them. Two parameter sets:

- `full`: every weight.
- `light`: a per-layer correction inside the existing weights: the LayerNorm affines and every bias
  (BitFit-style, about 2 % of GPT-2-shakespeare's parameters). The result is an ordinary checkpoint
  of the same architecture, so the distributed runtime needs no new code to use it.

Which recovers more per minute is measured in docs/CALIBRATION.md.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeprism.calibrate.emulate import emulate
from edgeprism.compress.registry import get_codec
from edgeprism.models.base import Inputs, ReferenceModel
from edgeprism.partition.transform import DEFAULT_AVERAGE, DEFAULT_SIZE_AWARE

log = logging.getLogger(__name__)

ParamSet = Literal["full", "light"]


class Task(Protocol):
    """Training data and a loss head for one model."""

    name: str
    head: nn.Module | None
    """Extra trainable module outside the reference model (a classifier), or None."""

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Inputs, Tensor]:
        """A random training batch: inputs, and targets (N,) int64 aligned with `logits`."""
        ...

    def logits(self, model: ReferenceModel, outputs: dict[str, Tensor], head: nn.Module | None) -> Tensor:
        """(N, classes) logits from a forward's outputs (the model's own or the emulated ones)."""
        ...


@dataclass(frozen=True)
class CalibrationSettings:
    """One calibration run. `lr` None: 1e-4 for `full`, 5e-3 for `light` (chosen by a short sweep on
    gpt2-shakespeare, docs/CALIBRATION.md; the fixture ended its own training at lr 0, so larger full
    fine-tuning rates first make it worse)."""

    codec: str
    world_size: int
    steps: int
    params: ParamSet = "full"
    lr: float | None = None
    batch_size: int = 8
    distill: float = 1.0
    """Weight of KL(uncompressed model's outputs ‖ emulated outputs); 0 = task loss only."""
    shares: tuple[float, ...] | None = None
    size_aware: bool = DEFAULT_SIZE_AWARE
    average: Literal["residual", "normed"] = DEFAULT_AVERAGE
    seed: int = 0
    warmup_steps: int = 10

    def __post_init__(self) -> None:
        get_codec(self.codec)  # ValueError naming the problem
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"calibration steps {self.steps!r} must be an integer >= 1 (a few hundred is typical)")
        if self.world_size < 2:
            raise ValueError(f"world size {self.world_size}: calibrating for a split needs at least 2 ranks")
        if self.params not in ("full", "light"):
            raise ValueError(f"parameter set {self.params!r} must be 'full' or 'light'")
        if self.batch_size < 1:
            raise ValueError(f"batch size {self.batch_size} must be >= 1")
        if self.distill < 0 or not math.isfinite(self.distill):
            raise ValueError(f"distillation weight {self.distill} must be a finite number >= 0")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"learning rate {self.lr} must be > 0")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.params == "full" else 5e-3)

    def to_dict(self) -> dict:
        return {**asdict(self), "learning_rate": self.learning_rate}


@dataclass
class CalibrationResult:
    settings: CalibrationSettings
    losses: list[float] = field(default_factory=list)
    """Training loss per step (task + distill·KL), on that step's batch."""
    train_time_s: float = 0.0
    train_cpu_s: float = 0.0
    """CPU seconds of this process while training (less sensitive to a shared machine than wall time)."""
    num_trainable: int = 0
    num_parameters: int = 0

    def to_dict(self) -> dict:
        return {"settings": self.settings.to_dict(), "train_time_s": self.train_time_s, "train_cpu_s": self.train_cpu_s,
                "num_trainable": self.num_trainable, "num_parameters": self.num_parameters,
                "first_loss": self.losses[0] if self.losses else None,
                "last_loss_mean10": sum(self.losses[-10:]) / max(1, len(self.losses[-10:]))}


def is_light_parameter(name: str, param: Tensor) -> bool:
    """LayerNorm affines (1-D `norm*` tensors) and biases: the `light` set."""
    return name.endswith(".bias") or ("norm" in name.rsplit(".", 2)[-2] and param.dim() == 1)


def trainable_parameters(modules: dict[str, nn.Module], params: ParamSet) -> list[nn.Parameter]:
    """Mark and return the parameters `params` trains; everything else is frozen."""
    chosen = []
    for prefix, module in modules.items():
        for name, param in module.named_parameters(prefix=prefix):
            train = params == "full" or is_light_parameter(name, param)
            param.requires_grad_(train)
            if train:
                chosen.append(param)
    return chosen


def codec_loss(model: ReferenceModel, task: Task, inputs: Inputs, targets: Tensor, settings: CalibrationSettings,
               head: nn.Module | None = None, teacher_logits: Tensor | None = None) -> Tensor:
    """The calibration loss of one batch with the codec in the loop (differentiable)."""
    outputs = emulate(model, inputs, get_codec(settings.codec), settings.world_size, settings.shares,
                      settings.size_aware, settings.average)
    logits = task.logits(model, outputs, head)  # (N, classes)
    loss = F.cross_entropy(logits, targets)
    if teacher_logits is not None and settings.distill > 0:
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), log_target=True,
                      reduction="batchmean")
        loss = loss + settings.distill * kl
    return loss


def calibrate(model: ReferenceModel, task: Task, settings: CalibrationSettings,
              progress: Callable[[str], None] | None = None,
              progress_every: int = 25) -> tuple[ReferenceModel, nn.Module | None, CalibrationResult]:
    """Fine-tune a copy of `model` (and of the task's head) with the codec in the loop.

    AdamW, linear warm-up then cosine decay, gradient clipping at 1. Returns (calibrated model in eval
    mode without gradients, calibrated head, result). `model` itself is left untouched."""
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    student = copy.deepcopy(model).train()
    head = copy.deepcopy(task.head) if task.head is not None else None
    modules = {"model": student, **({"head": head} if head is not None else {})}
    params = trainable_parameters(modules, settings.params)
    teacher = model.eval() if settings.distill > 0 else None
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, betas=(0.9, 0.99),
                                  weight_decay=0.01 if settings.params == "full" else 0.0)
    warmup = max(1, min(settings.warmup_steps, settings.steps // 5))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, settings.steps)
                                                                              / settings.steps)))
    result = CalibrationResult(settings, num_trainable=sum(p.numel() for p in params),
                               num_parameters=sum(p.numel() for m in modules.values() for p in m.parameters()))
    log.info("calibrating %s for %s at world size %d: %d of %d parameters (%s), %d steps",
             model.config.name, settings.codec, settings.world_size, result.num_trainable, result.num_parameters,
             settings.params, settings.steps)
    started, started_cpu = time.perf_counter(), time.process_time()
    for step in range(settings.steps):
        inputs, targets = task.batch(settings.batch_size, generator)
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = task.logits(teacher, teacher(inputs), task.head)
        loss = codec_loss(student, task, inputs, targets, settings, head, teacher_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        result.losses.append(float(loss.detach()))
        if progress and (step % progress_every == 0 or step == settings.steps - 1):
            recent = result.losses[-progress_every:]
            progress(f"step {step + 1}/{settings.steps} loss {sum(recent) / len(recent):.4f} "
                     f"({time.perf_counter() - started:.0f} s)")
    result.train_time_s = time.perf_counter() - started
    result.train_cpu_s = time.process_time() - started_cpu
    student.requires_grad_(False).eval()
    if head is not None:
        head.requires_grad_(False).eval()
    return student, head, result
