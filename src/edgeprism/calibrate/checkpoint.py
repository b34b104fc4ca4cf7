"""Write a reference model as a Hugging Face-format checkpoint directory that `load_checkpoint` reads back.

The names are the inverse of `models.loading.convert_hf_state_dict`, derived from its own tables
(`_TOP`, `_layer_map`), and `save_checkpoint` checks the round trip before writing, so the two
mappings cannot drift apart. No transformers import: config.json carries the fields
`models.loading.config_from_hf` reads (and transformers' own names for them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from edgeprism.models.base import ReferenceModel
from edgeprism.models.config import ModelConfig
from edgeprism.models.loading import _TOP, _layer_map, convert_hf_state_dict


def to_hf_state_dict(model: ReferenceModel) -> dict[str, Tensor]:
    """Our state dict under transformers' names (GPT2Model / ViTModel / Dinov2Model / BertModel)."""
    config = model.config
    family = config.family
    ours = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    top = {mine: hf for hf, mine in _TOP[family].items()}
    layer_prefix = "h." if family == "gpt2" else "encoder.layer."
    out: dict[str, Tensor] = {}
    for name, tensor in ours.items():
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            stem, param = rest.rsplit(".", 1)
            if family == "gpt2" and stem in ("attn.query", "attn.key", "attn.value"):
                if stem != "attn.query":
                    continue  # written with the query, as GPT-2's fused c_attn
                fused = torch.cat([ours[f"blocks.{index}.attn.{part}.{param}"] for part in ("query", "key", "value")])
                out[f"h.{index}.attn.c_attn.{param}"] = (fused.T if fused.dim() == 2 else fused).contiguous()
                continue
            inverse = {mine: hf for hf, mine in _layer_map(family, int(index), config.layerscale).items()}
            hf_param = "lambda1" if param == "scale" else param
            key = f"{layer_prefix}{index}.{inverse[stem]}.{hf_param}"
            conv1d = family == "gpt2" and param == "weight" and tensor.dim() == 2  # GPT-2 Conv1D: (in, out)
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
    c = config
    if c.family == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2Model"], "n_embd": c.hidden_size, "n_layer": c.num_layers,
                "n_head": c.num_heads, "n_inner": c.intermediate_size, "layer_norm_epsilon": c.layer_norm_eps,
                "activation_function": c.hidden_act, "vocab_size": c.vocab_size, "n_positions": c.max_positions,
                "tie_word_embeddings": True}
    common = {"hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
              "intermediate_size": c.intermediate_size, "hidden_act": c.hidden_act, "layer_norm_eps": c.layer_norm_eps}
    if c.family == "bert":
        return {"model_type": "bert", "architectures": ["BertModel"], **common, "vocab_size": c.vocab_size,
                "max_position_embeddings": c.max_positions, "type_vocab_size": c.type_vocab_size,
                "pad_token_id": c.pad_token_id}
    kind = "dinov2" if c.layerscale else "vit"
    return {"model_type": kind, "architectures": ["Dinov2Model" if c.layerscale else "ViTModel"], **common,
            "image_size": c.grid * c.patch_size, "patch_size": c.patch_size, "num_channels": c.num_channels,
            "mlp_ratio": c.intermediate_size / c.hidden_size, "edgeprism_preset": c.name}


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
