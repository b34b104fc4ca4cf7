"""Build reference models and load Hugging Face checkpoints from a local directory.

A checkpoint directory holds `config.json` and `model.safetensors` (or the shards a
`model.safetensors.index.json` names, or `pytorch_model.bin`, read with `weights_only=True`). Names follow
transformers' ViTModel / Dinov2Model / BertModel / GPT2Model, with or without a task head's prefix
(`vit.`, `bert.`, `transformer.`, `backbone.`). Nothing is downloaded.

A model is named one of two ways wherever edgeprism takes one (`--model`): a preset name
(`models/config.py`), or a checkpoint folder, whose architecture comes from its own config.json
(`resolve_model`). A folder travels between processes as (name, checkpoint): the name is the folder's
own name, and any process rebuilds the architecture from the checkpoint folder it is given
(`load_model`, `model_config`) — so a device of a cluster loads its own copy of the folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import typing
from pathlib import Path

import torch
from torch import Tensor

from edgeprism.models.base import ReferenceModel, check_blocks
from edgeprism.models.config import ModelConfig, get_config, list_presets
from edgeprism.models.registry import family_for_hf, get_family

log = logging.getLogger(__name__)

_PREFIXES = ("vit.", "bert.", "roberta.", "transformer.", "backbone.", "dinov2.", "model.")
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
        name = _strip_prefix(raw_name.replace(".gamma", ".weight").replace(".beta", ".bias"))
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


def read_config(directory: str | Path) -> dict:
    """config.json of a local checkpoint directory, as a dict (no weights read)."""
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
    if not isinstance(hf_config, dict):
        raise ValueError(f"{config_path} holds a {type(hf_config).__name__}, not a JSON object")
    return hf_config


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} could not be read ({err}); re-export the checkpoint") from None


def read_checkpoint(directory: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """(config.json as a dict, state dict) from a local checkpoint directory."""
    directory = Path(directory)
    hf_config = read_config(directory)
    safetensors_path, index_path, bin_path = (directory / name for name in _WEIGHT_FILES)
    if safetensors_path.is_file():
        state = _safetensors(safetensors_path)
    elif index_path.is_file():  # sharded: {"weight_map": {tensor name: shard file}}
        shards = sorted(set(json.loads(index_path.read_text()).get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{index_path} names no shard files in its weight_map")
        state = {}
        for shard in shards:
            state.update(_safetensors(directory / shard))
    elif bin_path.is_file():
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"checkpoint directory {directory} has none of {', '.join(_WEIGHT_FILES)}")
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
    """A preset with checkpoint weights if a directory is given, else seeded random weights; or a model
    whose architecture and weights come from a checkpoint folder (`name` the folder itself, or the name
    `resolve_model` gave it with the folder as `checkpoint`)."""
    name, checkpoint = resolve_model(name, checkpoint)
    if name not in list_presets() and checkpoint is not None:
        return load_pretrained(checkpoint, name)
    model = build_model(name, seed=seed)  # an unknown name: the registry's error listing the presets
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def folder_model_name(directory: str | Path) -> str:
    """The name a checkpoint folder's model goes by (profiles, plans, logs): the folder's own name, with
    ".folder" added when that is also a preset's name (a preset name always means the preset)."""
    name = Path(directory).resolve().name
    return f"{name}.folder" if name in list_presets() else name


def resolve_model(model: str | Path, checkpoint: str | Path | None = None) -> tuple[str, str | None]:
    """What users give as `--model` (a preset name, or a checkpoint folder) → (name, checkpoint folder or None).

    A folder is checked here, before any worker starts: its config.json names a supported architecture
    (else one ValueError naming its model_type and the supported families) and it holds weights. A preset
    name is returned unchanged, with `checkpoint` (its weights) if given."""
    text = str(model)
    looks_like_path = os.sep in text or text.startswith(".")
    is_folder = text not in list_presets() and Path(text).is_dir()
    folder = os.path.abspath(text)
    if is_folder and checkpoint is not None and os.path.abspath(checkpoint) != folder:
        if looks_like_path:
            raise ValueError(f"--model {text} is a checkpoint folder, so it names the weights too; drop "
                             f"--checkpoint {checkpoint} (or give --model <preset> --checkpoint {checkpoint})")
        is_folder = False  # a folder model's name (no path) with its checkpoint, e.g. on a joined device
    if not is_folder:
        if looks_like_path and text not in list_presets():
            raise ValueError(f"--model {text}: no such checkpoint folder (and not a preset; presets: "
                             f"{', '.join(list_presets())})")
        return text, (str(checkpoint) if checkpoint is not None else None)
    name = folder_model_name(folder)
    config_from_hf(read_config(folder), name)  # an unsupported model_type fails here, naming it
    if not any((Path(folder) / weights).is_file() for weights in _WEIGHT_FILES):
        raise ValueError(f"checkpoint folder {text} has none of {', '.join(_WEIGHT_FILES)}")
    return name, folder


def model_config(name: str | Path, checkpoint: str | Path | None = None) -> ModelConfig:
    """The architecture of a model as `load_model` takes it, without reading weights."""
    name, checkpoint = resolve_model(name, checkpoint)
    if name in list_presets() or checkpoint is None:
        return get_config(name)
    return folder_config(checkpoint, name)


def _tensor_names(directory: Path) -> list[str]:
    """The checkpoint's tensor names, read from the file headers where the format allows."""
    safetensors_path, index_path, _ = (directory / name for name in _WEIGHT_FILES)
    if safetensors_path.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors_path), framework="pt") as handle:
            return list(handle.keys())
    if index_path.is_file():
        return list(json.loads(index_path.read_text()).get("weight_map", {}))
    return list(read_checkpoint(directory)[1])


def folder_config(directory: str | Path, name: str, tensor_names: list[str] | None = None) -> ModelConfig:
    """A checkpoint folder's architecture: its config.json, with the dense+tanh pooler only where the
    weights hold one — a task model such as ViTForImageClassification has none, and pools the final-normed
    [CLS] (`pooler="cls"`), as its classifier reads it."""
    config = config_from_hf(read_config(directory), name)
    names = tensor_names if tensor_names is not None else _tensor_names(Path(directory))
    has_pooler = any(_strip_prefix(n).startswith("pooler.") for n in names)
    if config.pooler == "dense_tanh" and not has_pooler:
        config = dataclasses.replace(config, pooler="cls")
    return config


def _strip_prefix(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def config_from_hf(hf_config: dict, name: str) -> ModelConfig:
    """A ModelConfig from a transformers config.json, by the family whose `hf_model_types` name its
    `model_type` (vit, dinov2, bert, gpt2 built in)."""
    entry = family_for_hf(hf_config.get("model_type"))
    assert entry.config_from_hf is not None  # family_for_hf returns only families that read config.json
    return entry.config_from_hf(hf_config, name)


def load_pretrained(directory: str | Path, name: str | None = None) -> ReferenceModel:
    """A model whose architecture comes from the checkpoint's own config.json."""
    _, hf_state = read_checkpoint(directory)  # read once: config and weights
    config = folder_config(directory, name or Path(directory).name, list(hf_state))
    return load_checkpoint(build_model(config, seed=None), directory, hf_state)
