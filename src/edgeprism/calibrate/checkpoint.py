"""Write a reference model as a Hugging Face-format checkpoint directory that `load_checkpoint` reads back.

The names are the inverse of `models.loading.convert_hf_state_dict`, derived from the same tables
(the family's `CheckpointNames` in its registry entry), and `save_checkpoint` checks the round trip
before writing, so the two mappings cannot drift apart. No transformers import: config.json carries
the fields `models.loading.config_from_hf` reads (the family's `hf_config`, transformers' own names).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from edgeprism.models.base import ReferenceModel
from edgeprism.models.config import ModelConfig
from edgeprism.models.loading import convert_hf_state_dict
from edgeprism.models.registry import get_family


def to_hf_state_dict(model: ReferenceModel) -> dict[str, Tensor]:
    """Our state dict under transformers' names (GPT2Model / ViTModel / Dinov2Model / BertModel)."""
    config = model.config
    names = get_family(config.family).checkpoint
    if names is None:
        raise ValueError(f"{config.name}: family {config.family!r} has no transformers checkpoint names")
    ours = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    top = {mine: hf for hf, mine in names.top.items()}
    inverse = {mine: hf for hf, mine in names.layers(config).items()}
    fused_parts = ("attn.query", "attn.key", "attn.value") if names.fused_qkv else ()
    out: dict[str, Tensor] = {}
    for name, tensor in ours.items():
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            stem, param = rest.rsplit(".", 1)
            if stem in fused_parts:
                if stem != "attn.query":
                    continue  # written with the query, as one fused projection (GPT-2's c_attn)
                fused = torch.cat([ours[f"blocks.{index}.{part}.{param}"] for part in fused_parts])
                transposed = fused.T if names.conv1d and fused.dim() == 2 else fused
                out[f"{names.layer_prefix}{index}.{names.fused_qkv}.{param}"] = transposed.contiguous()
                continue
            hf_param = "lambda1" if param == "scale" else param
            key = f"{names.layer_prefix}{index}.{inverse[stem]}.{hf_param}"
            conv1d = names.conv1d and param == "weight" and tensor.dim() == 2  # Conv1D: (in, out)
            out[key] = (tensor.T if conv1d else tensor).contiguous()
            continue
        stem, _, param = name.rpartition(".")
        if name in top:  # bare parameters (ViT's cls_token, position_embeddings)
            out[top[name]] = tensor
        elif stem in top:
            out[f"{top[stem]}.{param}"] = tensor
        else:
            raise ValueError(f"{config.name}: no checkpoint name for tensor {name!r}")
    return out


def hf_config(config: ModelConfig) -> dict:
    """A transformers config.json for `config` (the fields `config_from_hf` reads)."""
    make = get_family(config.family).hf_config
    if make is None:
        raise ValueError(f"{config.name}: family {config.family!r} writes no transformers config.json")
    return make(config)


def save_checkpoint(model: ReferenceModel, directory: str | Path, extra: dict | None = None) -> Path:
    """Write config.json + model.safetensors to `directory` (created); `load_checkpoint(model, directory)`
    reads them back bit for bit. `extra` is merged into config.json (e.g. how the weights were made)."""
    from safetensors.torch import save_file

    state = to_hf_state_dict(model)
    back = convert_hf_state_dict(model.config, state)
    ours = model.state_dict()
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours), \
        f"{model.config.name}: checkpoint names do not round-trip"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({**hf_config(model.config), **(extra or {})}, indent=2) + "\n")
    return directory
