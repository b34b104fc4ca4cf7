"""Build reference models and load Hugging Face checkpoints from a local directory.

A checkpoint directory holds `config.json` and `model.safetensors` (or `pytorch_model.bin`, read with
`weights_only=True`). Names follow transformers' ViTModel / Dinov2Model / BertModel / GPT2Model, with
or without a task head's prefix (`vit.`, `bert.`, `transformer.`, `backbone.`). Nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import logging
from pathlib import Path

import torch
from torch import Tensor

from edgeprism.models.base import ReferenceModel
from edgeprism.models.bert import Bert
from edgeprism.models.config import ModelConfig, get_config
from edgeprism.models.gpt2 import GPT2
from edgeprism.models.vit import ViT

log = logging.getLogger(__name__)

FAMILIES = {"vit": ViT, "bert": Bert, "gpt2": GPT2}
_PREFIXES = ("vit.", "bert.", "transformer.", "backbone.", "dinov2.", "model.")
_IGNORED_SUFFIXES = ("position_ids", "mask_token")
_IGNORED_PATTERN = re.compile(r"^h\.\d+\.attn\.(masked_)?bias$")  # GPT-2's causal-mask buffers


def build_model(config: ModelConfig | str, seed: int | None = 0) -> ReferenceModel:
    """A reference model in eval mode; random weights drawn from `seed` (same seed → same weights)."""
    if isinstance(config, str):
        config = get_config(config)
    if seed is not None:
        torch.manual_seed(seed)
    model = FAMILIES[config.family](config)
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


def _layer_map(family: str, i: int, layerscale: bool) -> dict[str, str]:
    """HF name (relative to the layer) → our name (relative to blocks.i)."""
    if family == "gpt2":
        return {"ln_1": "norm1", "ln_2": "norm2", "attn.c_proj": "attn.output",
                "mlp.c_fc": "mlp.fc_in", "mlp.c_proj": "mlp.fc_out"}  # c_attn is split separately
    common = {"attention.attention.query": "attn.query", "attention.attention.key": "attn.key",
              "attention.attention.value": "attn.value", "attention.output.dense": "attn.output"}
    if family == "bert":
        return {"attention.self.query": "attn.query", "attention.self.key": "attn.key",
                "attention.self.value": "attn.value", "attention.output.dense": "attn.output",
                "attention.output.LayerNorm": "norm1", "intermediate.dense": "mlp.fc_in",
                "output.dense": "mlp.fc_out", "output.LayerNorm": "norm2"}
    if layerscale:  # Dinov2Model
        return {**common, "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc_in", "mlp.fc2": "mlp.fc_out",
                "layer_scale1": "scale1", "layer_scale2": "scale2"}
    return {**common, "layernorm_before": "norm1", "layernorm_after": "norm2",  # ViTModel
            "intermediate.dense": "mlp.fc_in", "output.dense": "mlp.fc_out"}


_TOP = {
    "vit": {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "position_embeddings",
            "embeddings.patch_embeddings.projection": "patch_embed", "layernorm": "norm", "pooler.dense": "pooler"},
    "bert": {"embeddings.word_embeddings": "word_embeddings", "embeddings.position_embeddings": "position_embeddings",
             "embeddings.token_type_embeddings": "token_type_embeddings", "embeddings.LayerNorm": "embed_norm",
             "pooler.dense": "pooler"},
    "gpt2": {"wte": "wte", "wpe": "wpe", "ln_f": "norm"},
}


def convert_hf_state_dict(config: ModelConfig, hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename (and for GPT-2's Conv1D, transpose and split) a transformers state dict to ours."""
    family = config.family
    out: dict[str, Tensor] = {}
    for raw_name, tensor in hf.items():
        name = raw_name.replace(".gamma", ".weight").replace(".beta", ".bias")
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name.endswith(_IGNORED_SUFFIXES) or _IGNORED_PATTERN.match(name) or name.startswith(("lm_head.", "classifier.", "cls.")):
            continue
        if name in ("embeddings.cls_token", "embeddings.position_embeddings"):  # bare parameters
            stem, param = name, ""
        else:
            stem, param = name.rsplit(".", 1)
        layer_prefix = "h." if family == "gpt2" else "encoder.layer."
        if stem.startswith(layer_prefix):
            index_str, rest = stem[len(layer_prefix):].split(".", 1)
            i = int(index_str)
            if family == "gpt2" and rest == "attn.c_attn":
                for part, chunk in zip(("query", "key", "value"), _gpt2_t(tensor, param).chunk(3, dim=0)):
                    out[f"blocks.{i}.attn.{part}.{param}"] = chunk.contiguous()
                continue
            mapping = _layer_map(family, i, config.layerscale)
            if rest not in mapping:
                raise ValueError(f"checkpoint tensor {raw_name!r} has no counterpart in {config.name}")
            ours_param = "scale" if param == "lambda1" else param  # Dinov2LayerScale.lambda1
            out[f"blocks.{i}.{mapping[rest]}.{ours_param}"] = _gpt2_t(tensor, param) if family == "gpt2" else tensor
            continue
        if stem not in _TOP[family]:
            raise ValueError(f"checkpoint tensor {raw_name!r} has no counterpart in {config.name}")
        out[_TOP[family][stem] + (f".{param}" if param else "")] = tensor
    return out


def _gpt2_t(tensor: Tensor, param: str) -> Tensor:
    """GPT-2's Conv1D stores weights as (in, out); nn.Linear wants (out, in)."""
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
    """A ModelConfig from a transformers config.json (ViT, Dinov2, BERT, GPT-2)."""
    kind = hf_config.get("model_type")
    if kind == "gpt2":
        d = hf_config["n_embd"]
        return ModelConfig(name, "gpt2", hidden_size=d, num_layers=hf_config["n_layer"], num_heads=hf_config["n_head"],
                           intermediate_size=hf_config.get("n_inner") or 4 * d,
                           layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
                           hidden_act=hf_config.get("activation_function", "gelu_new"),
                           vocab_size=hf_config["vocab_size"], max_positions=hf_config["n_positions"], pooler="none")
    common = dict(hidden_size=hf_config["hidden_size"], num_layers=hf_config["num_hidden_layers"],
                  num_heads=hf_config["num_attention_heads"], hidden_act=hf_config.get("hidden_act", "gelu"))
    if kind == "bert":
        return ModelConfig(name, "bert", intermediate_size=hf_config["intermediate_size"],
                           layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12), vocab_size=hf_config["vocab_size"],
                           max_positions=hf_config["max_position_embeddings"],
                           type_vocab_size=hf_config.get("type_vocab_size", 2),
                           pad_token_id=hf_config.get("pad_token_id", 0), **common)
    if kind in ("vit", "dinov2"):
        patch = hf_config["patch_size"]
        native = hf_config["image_size"]
        is_dinov2 = kind == "dinov2"
        inter = (int(common["hidden_size"] * hf_config.get("mlp_ratio", 4)) if is_dinov2
                 else hf_config["intermediate_size"])
        return ModelConfig(name, "vit", intermediate_size=inter,
                           layer_norm_eps=hf_config.get("layer_norm_eps", 1e-6 if is_dinov2 else 1e-12),
                           image_size=224 if is_dinov2 else native, patch_size=patch,
                           num_channels=hf_config.get("num_channels", 3), layerscale=is_dinov2,
                           position_grid=native // patch, pooler="cls" if is_dinov2 else "dense_tanh", **common)
    raise ValueError(f"config.json has model_type {kind!r}; edgeprism loads vit, dinov2, bert and gpt2 checkpoints")


def load_pretrained(directory: str | Path, name: str | None = None) -> ReferenceModel:
    """A model whose architecture comes from the checkpoint's own config.json."""
    hf_config, hf_state = read_checkpoint(directory)  # read once: config and weights
    config = config_from_hf(hf_config, name or Path(directory).name)
    return load_checkpoint(build_model(config, seed=None), directory, hf_state)
