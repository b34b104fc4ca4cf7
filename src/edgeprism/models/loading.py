"""Build reference models and load Hugging Face checkpoints from a local directory.

A checkpoint directory holds `config.json` and `model.safetensors` (or `pytorch_model.bin`, read with
`weights_only=True`). Names follow transformers' ViTModel / Dinov2Model / BertModel / GPT2Model, with
or without a task head's prefix (`vit.`, `bert.`, `transformer.`, `backbone.`). Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import re
import typing
from pathlib import Path

import torch
from torch import Tensor

from edgeprism.models.base import ReferenceModel, check_blocks
from edgeprism.models.config import ModelConfig, get_config
from edgeprism.models.registry import family_for_hf, get_family

log = logging.getLogger(__name__)

_PREFIXES = ("vit.", "bert.", "transformer.", "backbone.", "dinov2.", "model.")
_IGNORED_SUFFIXES = ("position_ids", "mask_token")
_IGNORED_PATTERN = re.compile(r"^h\.\d+\.attn\.(masked_)?bias$")  # GPT-2's causal-mask buffers


def build_model(config: ModelConfig | str, seed: int | None = 0) -> ReferenceModel:
    """A reference model in eval mode; random weights drawn from `seed` (same seed → same weights)."""
    if isinstance(config, str):
        config = get_config(config)
    if seed is not None:
        torch.manual_seed(seed)
    model = typing.cast(ReferenceModel, get_family(config.family).model_class(config))
    check_blocks(model)
    if seed is not None:
        _randomize(model, seed)
    return model.requires_grad_(False).eval()  # an inference library: no autograd graphs


def _randomize(model: ReferenceModel, seed: int) -> None:
    """Non-trivial random weights (LayerNorm/LayerScale away from 1/0) so tests exercise every term."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.02
            if name.endswith("scale") or ("norm" in name and name.endswith("weight")):
                param.copy_(1.0 + noise * 5)
            else:
                param.copy_(noise)


def convert_hf_state_dict(config: ModelConfig, hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename (and for fused/Conv1D layers such as GPT-2's, transpose and split) a transformers state dict
    to ours, by the family's `CheckpointNames`."""
    names = get_family(config.family).checkpoint
    if names is None:
        raise ValueError(f"{config.name}: family {config.family!r} reads no transformers checkpoints")
    layer_names = names.layers(config)
    out: dict[str, Tensor] = {}
    for raw_name, tensor in hf.items():
        name = raw_name.replace(".gamma", ".weight").replace(".beta", ".bias")
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        untied_head = name.startswith("lm_head.") and "lm_head" in names.top and not config.tie_word_embeddings
        if (
            name.endswith(_IGNORED_SUFFIXES)
            or _IGNORED_PATTERN.match(name)
            or (name.startswith(("lm_head.", "classifier.", "cls.")) and not untied_head)
        ):
            continue
        if name in ("embeddings.cls_token", "embeddings.position_embeddings"):  # bare parameters
            stem, param = name, ""
        else:
            stem, param = name.rsplit(".", 1)
        if stem.startswith(names.layer_prefix):
            index_str, rest = stem[len(names.layer_prefix):].split(".", 1)
            i = int(index_str)
            if names.fused_qkv and rest == names.fused_qkv:
                fused = _conv1d_t(tensor, param) if names.conv1d else tensor
                for part, chunk in zip(("query", "key", "value"), fused.chunk(3, dim=0)):
                    out[f"blocks.{i}.attn.{part}.{param}"] = chunk.contiguous()
                continue
            if rest not in layer_names:
                raise ValueError(f"checkpoint tensor {raw_name!r} has no counterpart in {config.name}")
            ours_param = "scale" if param == "lambda1" else param  # Dinov2LayerScale.lambda1
            out[f"blocks.{i}.{layer_names[rest]}.{ours_param}"] = _conv1d_t(tensor, param) if names.conv1d else tensor
            continue
        if stem not in names.top:
            raise ValueError(f"checkpoint tensor {raw_name!r} has no counterpart in {config.name}")
        out[names.top[stem] + (f".{param}" if param else "")] = tensor
    return out


def _conv1d_t(tensor: Tensor, param: str) -> Tensor:
    """A Conv1D (GPT-2) stores weights as (in, out); nn.Linear wants (out, in)."""
    return tensor.T.contiguous() if param == "weight" and tensor.dim() == 2 else tensor


def read_checkpoint(directory: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """(config.json as a dict, state dict) from a local checkpoint directory."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not directory.is_dir():
        raise ValueError(f"checkpoint directory {directory} does not exist")
    if not config_path.is_file():
        raise ValueError(f"checkpoint directory {directory} has no config.json; give a Hugging Face model directory")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err})") from None
    safetensors_path = directory / "model.safetensors"
    bin_path = directory / "pytorch_model.bin"
    if safetensors_path.is_file():
        from safetensors.torch import load_file

        try:
            state = load_file(str(safetensors_path))
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{safetensors_path} could not be read ({err}); re-export the checkpoint") from None
    elif bin_path.is_file():
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"checkpoint directory {directory} has neither model.safetensors nor pytorch_model.bin")
    return hf_config, state


def load_checkpoint(model: ReferenceModel, directory: str | Path,
                    hf_state: dict[str, Tensor] | None = None) -> ReferenceModel:
    """Load HF weights into `model`, refusing any missing tensor or shape mismatch, naming them.
    `hf_state`: the checkpoint's tensors if the caller has read them already (`read_checkpoint`)."""
    if hf_state is None:
        _, hf_state = read_checkpoint(directory)
    state = convert_hf_state_dict(model.config, hf_state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"checkpoint {directory} lacks {len(missing)} tensors {model.config.name} needs, "
                         f"e.g. {missing[:3]}; is it a {model.config.family} checkpoint of this size?")
    for name, tensor in state.items():
        if name not in expected:
            raise ValueError(f"checkpoint {directory} has an unexpected tensor {name!r} for {model.config.name}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"checkpoint {directory}: {name} has shape {tuple(tensor.shape)}, but {model.config.name} "
                             f"expects {tuple(expected[name].shape)}; the checkpoint does not match the config")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.eval()


def load_model(name: str, checkpoint: str | Path | None = None, seed: int = 0) -> ReferenceModel:
    """The named preset, with checkpoint weights if a directory is given, else seeded random weights."""
    model = build_model(name, seed=seed)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def config_from_hf(hf_config: dict, name: str) -> ModelConfig:
    """A ModelConfig from a transformers config.json, by the family whose `hf_model_types` name its
    `model_type` (vit, dinov2, bert, gpt2 built in)."""
    entry = family_for_hf(hf_config.get("model_type"))
    assert entry.config_from_hf is not None  # family_for_hf returns only families that read config.json
    return entry.config_from_hf(hf_config, name)


def load_pretrained(directory: str | Path, name: str | None = None) -> ReferenceModel:
    """A model whose architecture comes from the checkpoint's own config.json."""
    hf_config, hf_state = read_checkpoint(directory)  # read once: config and weights
    config = config_from_hf(hf_config, name or Path(directory).name)
    return load_checkpoint(build_model(config, seed=None), directory, hf_state)
