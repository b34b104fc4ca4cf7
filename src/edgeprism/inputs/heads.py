"""Model outputs → answers: the sentence-embedding pooling rule and the optional classifier of a checkpoint.

**Pooling.** A sentence-transformers folder (``modules.json`` listing a ``Transformer``, a ``Pooling`` whose
``<path>/config.json`` sets ``pooling_mode_*`` flags, and optionally ``Normalize``) pools as it says: [CLS],
mean over valid tokens and/or mean·sqrt(n) (concatenated in sentence-transformers' order), then L2 if Normalize
is listed. Any other module (Dense, ...) or mode (max, last token, weighted mean) is refused at load. Every
other folder pools the final [CLS] row.

**Classifier.** Looked up in this order:

1. ``classifier.json`` + ``classifier.safetensors`` (edgeprism's convention, written by `save_classifier`):
   the safetensors file holds ``weight`` (C, d) and ``bias`` (C,); the json holds ``id2label``
   ({"0": "name", ...}), ``input`` (which features it reads: ``embedding`` = `ModelIO.embeddings`, or the
   model outputs ``cls`` / ``pooled`` / ``mean``) and a free-text ``source``.
2. A transformers task head in the weights (``classifier.weight``/``classifier.bias``) with ``id2label`` from
   ``config.json``: ViTForImageClassification reads the final [CLS] row, BertForSequenceClassification the
   pooled output, Dinov2ForImageClassification [CLS] concatenated with the mean of the patch tokens.

Scores are the softmax of ``features @ weight.T + bias``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

PoolMode = Literal["cls", "mean", "mean_sqrt_len"]
ClassifierInput = Literal["embedding", "cls", "pooled", "mean", "cls+patch_mean"]
CLASSIFIER_JSON = "classifier.json"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
_HF_HEADS: dict[str, ClassifierInput] = {"ViTForImageClassification": "cls",
                                          "BertForSequenceClassification": "pooled",
                                          "Dinov2ForImageClassification": "cls+patch_mean"}
_ST_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
             "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}  # sentence-transformers' concatenation order
_ST_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


@dataclass(frozen=True)
class Pooling:
    modes: tuple[PoolMode, ...] = ("cls",)
    normalize: bool = False
    source: str = "default: [CLS]"

    def __str__(self) -> str:
        return "+".join(self.modes) + (" then L2" if self.normalize else "") + f" ({self.source})"

    def __call__(self, outputs: dict[str, Tensor], inputs: dict[str, Tensor]) -> Tensor:
        parts = [_feature(outputs, inputs, mode) for mode in self.modes]
        pooled = torch.cat(parts, dim=-1).float()  # (B, d * len(modes))
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled


def _valid_counts(inputs: dict[str, Tensor], batch: int, num_tokens: int | None) -> Tensor:
    mask = inputs.get("attention_mask")
    if mask is not None:
        return mask.sum(1).float().clamp_min(1.0)  # (B,)
    if num_tokens is None:
        raise ValueError("pooling needs the attention_mask of the inputs (or the hidden states)")
    return torch.full((batch,), float(num_tokens))


def _feature(outputs: dict[str, Tensor], inputs: dict[str, Tensor], name: str, num_tokens: int | None = None) -> Tensor:
    """(B, d) feature `name` from the model outputs; 'mean' falls back to masked-mean of 'hidden'."""
    if name in ("cls", "pooled") and name in outputs:
        return outputs[name]
    if name == "cls" and "hidden" in outputs:
        return outputs["hidden"][:, 0]
    if name in ("mean", "mean_sqrt_len"):
        if "mean" in outputs:
            mean = outputs["mean"]
        elif "hidden" in outputs:
            hidden = outputs["hidden"]  # (B, T, d)
            weights = inputs.get("attention_mask", torch.ones(hidden.shape[:2])).to(hidden.dtype)[..., None]
            mean = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        else:
            raise ValueError(f"outputs have keys {sorted(outputs)}; mean pooling needs 'mean' or 'hidden'")
        if name == "mean":
            return mean
        counts = _valid_counts(inputs, mean.shape[0], num_tokens)
        return mean * counts.sqrt()[:, None].to(mean.dtype)  # sum / sqrt(n)
    raise ValueError(f"outputs have keys {sorted(outputs)}; feature {name!r} is not among them")


def read_pooling(folder: Path | None) -> Pooling:
    """The pooling a checkpoint folder declares (sentence-transformers files), else [CLS]."""
    path = folder / "modules.json" if folder is not None else None
    if path is None or not path.is_file():
        return Pooling()
    modules = json.loads(path.read_text())
    modes: tuple[PoolMode, ...] = ()
    normalize = False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            config_path = folder / module.get("path", "") / "config.json"
            if not config_path.is_file():
                raise ValueError(f"{path} lists a Pooling module but {config_path} does not exist")
            modes = _pool_modes(json.loads(config_path.read_text()), config_path)
        else:
            raise ValueError(f"{path} lists module {module.get('type')!r} at {module.get('path')!r}; edgeprism "
                             f"applies only Transformer, Pooling and Normalize, so its embeddings would be wrong")
    if not modes:
        raise ValueError(f"{path} lists no Pooling module; cannot tell how to pool the sentence embedding")
    return Pooling(modes, normalize, "modules.json")


def _pool_modes(config: dict, path: Path) -> tuple[PoolMode, ...]:
    if isinstance(config.get("pooling_mode"), str):  # newer sentence-transformers also write the mode by name
        config = {**config, f"pooling_mode_{config['pooling_mode']}_tokens": True,
                  f"pooling_mode_{config['pooling_mode']}": True}
    unsupported = [k for k in _ST_UNSUPPORTED if config.get(k)]
    if unsupported:
        raise ValueError(f"{path} asks for {unsupported}; edgeprism pools with [CLS], mean and mean_sqrt_len only")
    modes = tuple(mode for key, mode in _ST_MODES.items() if config.get(key))
    if not modes:
        raise ValueError(f"{path} sets no pooling_mode_* flag edgeprism knows ({sorted(_ST_MODES)})")
    return modes


@dataclass(frozen=True, eq=False)
class Classifier:
    """Affine head: ``softmax(features @ weight.T + bias)`` over `labels`."""

    weight: Tensor
    """(num_classes, num_features) float32."""
    bias: Tensor
    """(num_classes,) float32."""
    labels: tuple[str, ...]
    input: ClassifierInput
    source: str

    def __post_init__(self) -> None:
        num_classes = self.weight.shape[0]
        if self.weight.dim() != 2 or tuple(self.bias.shape) != (num_classes,) or len(self.labels) != num_classes:
            raise ValueError(f"{self.source}: weight {tuple(self.weight.shape)}, bias {tuple(self.bias.shape)} and "
                             f"{len(self.labels)} labels do not agree on the number of classes")

    def __str__(self) -> str:
        return f"{len(self.labels)} labels over {self.input} ({self.source})"

    def features(self, outputs: dict[str, Tensor], inputs: dict[str, Tensor], embeddings: Tensor | None,
                 num_tokens: int | None) -> Tensor:
        """(B, num_features) input of the head."""
        if self.input == "embedding":
            return embeddings
        if self.input == "cls+patch_mean":  # Dinov2ForImageClassification: [CLS] ++ mean of the patch tokens
            cls = _feature(outputs, inputs, "cls")
            if "hidden" in outputs:
                patch_mean = outputs["hidden"][:, 1:].mean(1)
            else:  # outputs["mean"] averages all T tokens, [CLS] included
                patch_mean = (_feature(outputs, inputs, "mean") * num_tokens - cls) / (num_tokens - 1)
            return torch.cat([cls, patch_mean], dim=-1)
        return _feature(outputs, inputs, self.input)

    def top_k(self, features: Tensor, k: int) -> list[list[tuple[str, float]]]:
        if features.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"{self.source} takes {self.weight.shape[1]} features; got {features.shape[-1]}")
        logits = features.float() @ self.weight.to(features.device).T + self.bias.to(features.device)
        scores, indices = logits.softmax(-1).topk(min(k, len(self.labels)), dim=-1)  # (B, k)
        return [[(self.labels[i], float(s)) for s, i in zip(row_s.tolist(), row_i.tolist())]
                for row_s, row_i in zip(scores, indices)]


def _labels(id2label: dict | None, num_classes: int, source: str) -> tuple[str, ...]:
    if not id2label:
        return tuple(f"LABEL_{i}" for i in range(num_classes))
    try:
        by_index = {int(k): str(v) for k, v in id2label.items()}
    except ValueError:
        raise ValueError(f"{source}: id2label keys must be class indices; got {sorted(id2label)[:3]}") from None
    if sorted(by_index) != list(range(num_classes)):
        raise ValueError(f"{source}: id2label has {len(by_index)} entries for {num_classes} classes")
    return tuple(by_index[i] for i in range(num_classes))


def read_classifier(folder: Path | None, hf_config: dict) -> Classifier | None:
    """The checkpoint's classifier (edgeprism's files first, then a transformers head), or None."""
    if folder is None:
        return None
    meta_path, weights_path = folder / CLASSIFIER_JSON, folder / CLASSIFIER_WEIGHTS
    if meta_path.is_file() or weights_path.is_file():
        if not (meta_path.is_file() and weights_path.is_file()):
            raise ValueError(f"{folder} has only one of {CLASSIFIER_JSON} and {CLASSIFIER_WEIGHTS}; give both")
        meta = json.loads(meta_path.read_text())
        with safe_open(str(weights_path), "pt") as f:
            weight, bias = f.get_tensor("weight").float(), f.get_tensor("bias").float()
        kind = meta.get("input", "embedding")
        if kind not in ("embedding", "cls", "pooled", "mean", "cls+patch_mean"):
            raise ValueError(f"{meta_path} has input {kind!r}; choose embedding, cls, pooled or mean")
        return Classifier(weight, bias, _labels(meta.get("id2label"), weight.shape[0], str(meta_path)), kind,
                          str(meta.get("source") or meta_path))
    architecture = (hf_config.get("architectures") or [""])[0]
    if architecture not in _HF_HEADS:
        return None
    state = _read_head(folder)
    if state is None:
        return None
    source = f"{architecture} head in {folder.name}"
    return Classifier(state[0], state[1], _labels(hf_config.get("id2label"), state[0].shape[0], source),
                      _HF_HEADS[architecture], source)


def _read_head(folder: Path) -> tuple[Tensor, Tensor] | None:
    names = ("classifier.weight", "classifier.bias")
    if (folder / "model.safetensors").is_file():
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            if not set(names) <= set(f.keys()):
                return None
            return f.get_tensor(names[0]).float(), f.get_tensor(names[1]).float()
    if (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        if set(names) <= set(state):
            return state[names[0]].float(), state[names[1]].float()
    return None


def save_classifier(folder: str | Path, weight, bias, labels: tuple[str, ...] | list[str],
                    input: ClassifierInput = "embedding", source: str = "") -> None:
    """Write ``classifier.safetensors`` (weight (C, d), bias (C,)) and ``classifier.json`` into `folder`."""
    weight = torch.as_tensor(weight, dtype=torch.float32).contiguous()
    bias = torch.as_tensor(bias, dtype=torch.float32).contiguous()
    Classifier(weight, bias, tuple(labels), input, source or str(folder))  # validates the shapes
    folder = Path(folder)
    save_file({"weight": weight, "bias": bias}, str(folder / CLASSIFIER_WEIGHTS), metadata={"format": "pt"})
    meta = {"input": input, "id2label": {str(i): label for i, label in enumerate(labels)}, "source": source}
    (folder / CLASSIFIER_JSON).write_text(json.dumps(meta, indent=2) + "\n")
