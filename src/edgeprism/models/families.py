"""The built-in families' registry entries: ViT (and DINOv2), BERT, GPT-2, Llama.

Each entry gathers what used to be spread over the code as `if family == ...`: the model class, the
modality and causality, the request keys, the synthetic-input maker, the transformers checkpoint names
and config.json fields (both directions), and the transformers twin the tests and benchmarks compare
against. `models/__init__.py` imports this module, so the entries exist whenever any model does.
"""

from __future__ import annotations

from typing import cast

from edgeprism.models.bert import TEXT_KEYS, Bert
from edgeprism.models.config import ModelConfig, RopeType
from edgeprism.models.gpt2 import GPT2
from edgeprism.models.llama import LLAMA3_KEYS, Llama
from edgeprism.models.registry import CheckpointNames, FamilyEntry, register_family
from edgeprism.models.synthetic import image_inputs, text_inputs, text_inputs_with_types
from edgeprism.models.vit import ViT


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("the transformers twin needs transformers: pip install transformers") from None
    return transformers


# ---- ViT / DINOv2 (ViTModel, Dinov2Model) ----

def _vit_layers(config: ModelConfig) -> dict[str, str]:
    common = {"attention.attention.query": "attn.query", "attention.attention.key": "attn.key",
              "attention.attention.value": "attn.value", "attention.output.dense": "attn.output"}
    if config.layerscale:  # Dinov2Model
        return {**common, "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc_in", "mlp.fc2": "mlp.fc_out",
                "layer_scale1": "scale1", "layer_scale2": "scale2"}
    return {**common, "layernorm_before": "norm1", "layernorm_after": "norm2",  # ViTModel
            "intermediate.dense": "mlp.fc_in", "output.dense": "mlp.fc_out"}


def _vit_from_hf(hf_config: dict, name: str) -> ModelConfig:
    kind = hf_config.get("model_type")
    patch = hf_config["patch_size"]
    native = hf_config["image_size"]
    is_dinov2 = kind == "dinov2"
    hidden = hf_config["hidden_size"]
    inter = int(hidden * hf_config.get("mlp_ratio", 4)) if is_dinov2 else hf_config["intermediate_size"]
    return ModelConfig(name, "vit", hidden_size=hidden, num_layers=hf_config["num_hidden_layers"],
                       num_heads=hf_config["num_attention_heads"], hidden_act=hf_config.get("hidden_act", "gelu"),
                       intermediate_size=inter,
                       layer_norm_eps=hf_config.get("layer_norm_eps", 1e-6 if is_dinov2 else 1e-12),
                       image_size=224 if is_dinov2 else native, patch_size=patch,
                       num_channels=hf_config.get("num_channels", 3), layerscale=is_dinov2,
                       position_grid=native // patch, pooler="cls" if is_dinov2 else "dense_tanh")


def _encoder_hf_common(c: ModelConfig) -> dict:
    return {"hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "intermediate_size": c.intermediate_size, "hidden_act": c.hidden_act, "layer_norm_eps": c.layer_norm_eps}


def _vit_hf_config(c: ModelConfig) -> dict:
    kind = "dinov2" if c.layerscale else "vit"
    return {"model_type": kind, "architectures": ["Dinov2Model" if c.layerscale else "ViTModel"],
            **_encoder_hf_common(c), "image_size": c.grid * c.patch_size, "patch_size": c.patch_size,
            "num_channels": c.num_channels, "mlp_ratio": c.intermediate_size / c.hidden_size,
            "edgeprism_preset": c.name}


def _vit_twin(c: ModelConfig):
    transformers = _transformers()
    if c.layerscale:
        raise ValueError(f"{c.name}: the transformers twin covers ViTModel, not DINOv2")
    config = transformers.ViTConfig(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                                    num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
                                    image_size=c.image_size, patch_size=c.patch_size,
                                    num_channels=c.num_channels, layer_norm_eps=c.layer_norm_eps,
                                    hidden_act=c.hidden_act, attn_implementation="sdpa")
    return transformers.ViTModel(config, add_pooling_layer=c.pooler == "dense_tanh")


VIT = FamilyEntry(
    "vit", ViT, modality="image", causal=False, input_keys=("pixel_values",), synthetic_inputs=image_inputs,
    checkpoint=CheckpointNames(
        "encoder.layer.",
        {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "position_embeddings",
         "embeddings.patch_embeddings.projection": "patch_embed", "layernorm": "norm", "pooler.dense": "pooler"},
        _vit_layers),
    hf_model_types=("vit", "dinov2"), config_from_hf=_vit_from_hf, hf_config=_vit_hf_config,
    reference_twin=_vit_twin)


# ---- BERT (BertModel) ----

def _bert_layers(config: ModelConfig) -> dict[str, str]:
    return {"attention.self.query": "attn.query", "attention.self.key": "attn.key",
            "attention.self.value": "attn.value", "attention.output.dense": "attn.output",
            "attention.output.LayerNorm": "norm1", "intermediate.dense": "mlp.fc_in",
            "output.dense": "mlp.fc_out", "output.LayerNorm": "norm2"}


_ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")
"""BERT's blocks and embeddings, positions counted from pad_token_id + 1 (transformers'
`create_position_ids_from_input_ids`: right-padded rows give their real tokens exactly these)."""


def _bert_from_hf(hf_config: dict, name: str) -> ModelConfig:
    pad = hf_config.get("pad_token_id", 1 if hf_config.get("model_type") in _ROBERTA_TYPES else 0)
    offset = pad + 1 if hf_config.get("model_type") in _ROBERTA_TYPES else 0
    return ModelConfig(name, "bert", hidden_size=hf_config["hidden_size"], num_layers=hf_config["num_hidden_layers"],
                       num_heads=hf_config["num_attention_heads"], hidden_act=hf_config.get("hidden_act", "gelu"),
                       intermediate_size=hf_config["intermediate_size"],
                       layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12), vocab_size=hf_config["vocab_size"],
                       max_positions=hf_config["max_position_embeddings"] - offset,
                       type_vocab_size=hf_config.get("type_vocab_size", 2), pad_token_id=pad,
                       position_offset=offset)


def _bert_hf_config(c: ModelConfig) -> dict:
    if c.position_offset and c.position_offset != c.pad_token_id + 1:
        raise ValueError(f"{c.name}: position offset {c.position_offset} is not pad_token_id {c.pad_token_id} + 1, "
                         f"which no transformers config.json can say")
    kind, model = ("roberta", "RobertaModel") if c.position_offset else ("bert", "BertModel")
    return {"model_type": kind, "architectures": [model], **_encoder_hf_common(c), "vocab_size": c.vocab_size,
            "max_position_embeddings": c.position_offset + c.max_positions, "type_vocab_size": c.type_vocab_size,
            "pad_token_id": c.pad_token_id}


def _bert_twin(c: ModelConfig):
    transformers = _transformers()
    config_class, model_class = ((transformers.RobertaConfig, transformers.RobertaModel) if c.position_offset
                                 else (transformers.BertConfig, transformers.BertModel))
    config = config_class(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                          num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                          intermediate_size=c.intermediate_size,
                          max_position_embeddings=c.position_offset + c.max_positions,
                          type_vocab_size=c.type_vocab_size, layer_norm_eps=c.layer_norm_eps,
                          pad_token_id=c.pad_token_id, hidden_act=c.hidden_act, attn_implementation="sdpa")
    return model_class(config, add_pooling_layer=c.pooler == "dense_tanh")


BERT = FamilyEntry(
    "bert", Bert, modality="text", causal=False, input_keys=("input_ids", *sorted(TEXT_KEYS - {"input_ids"})),
    synthetic_inputs=text_inputs_with_types, pipeline_keys=("input_ids", "token_type_ids"),
    checkpoint=CheckpointNames(
        "encoder.layer.",
        {"embeddings.word_embeddings": "word_embeddings", "embeddings.position_embeddings": "position_embeddings",
         "embeddings.token_type_embeddings": "token_type_embeddings", "embeddings.LayerNorm": "embed_norm",
         "pooler.dense": "pooler"},
        _bert_layers),
    hf_model_types=("bert", *_ROBERTA_TYPES), config_from_hf=_bert_from_hf, hf_config=_bert_hf_config,
    reference_twin=_bert_twin)


# ---- GPT-2 (GPT2Model) ----

def _gpt2_layers(config: ModelConfig) -> dict[str, str]:
    return {"ln_1": "norm1", "ln_2": "norm2", "attn.c_proj": "attn.output",
            "mlp.c_fc": "mlp.fc_in", "mlp.c_proj": "mlp.fc_out"}  # c_attn: CheckpointNames.fused_qkv


def _gpt2_from_hf(hf_config: dict, name: str) -> ModelConfig:
    d = hf_config["n_embd"]
    return ModelConfig(name, "gpt2", hidden_size=d, num_layers=hf_config["n_layer"], num_heads=hf_config["n_head"],
                       intermediate_size=hf_config.get("n_inner") or 4 * d,
                       layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
                       hidden_act=hf_config.get("activation_function", "gelu_new"),
                       vocab_size=hf_config["vocab_size"], max_positions=hf_config["n_positions"], pooler="none")


def _gpt2_hf_config(c: ModelConfig) -> dict:
    return {"model_type": "gpt2", "architectures": ["GPT2Model"], "n_embd": c.hidden_size, "n_layer": c.num_layers,
            "n_head": c.num_heads, "n_inner": c.intermediate_size, "layer_norm_epsilon": c.layer_norm_eps,
            "activation_function": c.hidden_act, "vocab_size": c.vocab_size, "n_positions": c.max_positions,
            "tie_word_embeddings": True}


def _gpt2_twin(c: ModelConfig):
    transformers = _transformers()
    config = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_positions, n_embd=c.hidden_size,
                                     n_layer=c.num_layers, n_head=c.num_heads, n_inner=c.intermediate_size,
                                     layer_norm_epsilon=c.layer_norm_eps, activation_function=c.hidden_act,
                                     attn_implementation="sdpa")
    return transformers.GPT2Model(config)


GPT2_FAMILY = FamilyEntry(
    "gpt2", GPT2, modality="text", causal=True, input_keys=("input_ids", "attention_mask"),
    synthetic_inputs=text_inputs,
    checkpoint=CheckpointNames("h.", {"wte": "wte", "wpe": "wpe", "ln_f": "norm"}, _gpt2_layers,
                               fused_qkv="attn.c_attn", conv1d=True),
    hf_model_types=("gpt2",), config_from_hf=_gpt2_from_hf, hf_config=_gpt2_hf_config, reference_twin=_gpt2_twin)


# ---- Llama (LlamaForCausalLM: SmolLM2, TinyLlama, Llama 2/3 ...) ----

def _llama_layers(config: ModelConfig) -> dict[str, str]:
    return {"self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key", "self_attn.v_proj": "attn.value",
            "self_attn.o_proj": "attn.output", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
            "mlp.down_proj": "mlp.down", "input_layernorm": "norm1", "post_attention_layernorm": "norm2"}


_ROPE_PARAMS = {"default": (), "linear": ("factor",), "llama3": LLAMA3_KEYS}


def _llama_rope(hf_config: dict) -> tuple[RopeType, float, tuple[tuple[str, float], ...]]:
    """(rope type, base, scaling parameters) from config.json: transformers 4's `rope_theta` + `rope_scaling`
    or transformers 5's `rope_parameters`."""
    params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_PARAMS:
        raise ValueError(f"rope scaling type {kind!r} is not supported; edgeprism's Llama reads none, 'linear' "
                         f"and 'llama3'")
    theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    missing = [k for k in _ROPE_PARAMS[kind] if k not in params]
    if missing:
        raise ValueError(f"rope scaling {kind!r} lacks {', '.join(missing)} in config.json")
    return cast(RopeType, kind), theta, tuple((k, float(params[k])) for k in _ROPE_PARAMS[kind])


def _llama_from_hf(hf_config: dict, name: str) -> ModelConfig:
    d, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or d // heads
    if head_dim * heads != d:
        raise ValueError(f"config.json: head_dim {head_dim} x {heads} heads != hidden_size {d}; edgeprism's Llama "
                         f"needs head_dim = hidden_size / num_attention_heads")
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        raise ValueError("config.json sets attention_bias/mlp_bias; edgeprism's Llama has no projection biases")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf_config['hidden_act']!r}; Llama's SwiGLU uses silu")
    kind, theta, scaling = _llama_rope(hf_config)
    return ModelConfig(name, "llama", hidden_size=d, num_layers=hf_config["num_hidden_layers"], num_heads=heads,
                       num_kv_heads=hf_config.get("num_key_value_heads") or heads,
                       intermediate_size=hf_config["intermediate_size"],
                       layer_norm_eps=hf_config.get("rms_norm_eps", 1e-6), hidden_act="silu",
                       vocab_size=hf_config["vocab_size"], max_positions=hf_config["max_position_embeddings"],
                       rope_theta=theta, rope_type=kind, rope_scaling=scaling,
                       tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)), pooler="none")


def _llama_rope_parameters(c: ModelConfig) -> dict:
    return {"rope_type": c.rope_type, "rope_theta": c.rope_theta, **dict(c.rope_scaling)}


def _llama_hf_config(c: ModelConfig) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads, "num_key_value_heads": c.kv_heads,
            "head_dim": c.head_dim, "intermediate_size": c.intermediate_size, "hidden_act": "silu",
            "rms_norm_eps": c.layer_norm_eps, "vocab_size": c.vocab_size, "max_position_embeddings": c.max_positions,
            "rope_theta": c.rope_theta, "rope_parameters": _llama_rope_parameters(c),
            "rope_scaling": None if c.rope_type == "default" else _llama_rope_parameters(c),
            "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": False, "mlp_bias": False}


def _llama_twin(c: ModelConfig):
    transformers = _transformers()
    config = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                      intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                                      num_attention_heads=c.num_heads, num_key_value_heads=c.kv_heads,
                                      max_position_embeddings=c.max_positions, rms_norm_eps=c.layer_norm_eps,
                                      rope_parameters=_llama_rope_parameters(c),
                                      tie_word_embeddings=c.tie_word_embeddings, attn_implementation="sdpa")
    return transformers.LlamaModel(config)  # the hidden states, as the other twins (no LM head)


LLAMA = FamilyEntry(
    "llama", Llama, modality="text", causal=True, input_keys=("input_ids", "attention_mask"),
    synthetic_inputs=text_inputs,
    checkpoint=CheckpointNames("layers.", {"embed_tokens": "embed_tokens", "norm": "norm", "lm_head": "lm_head"},
                               _llama_layers),
    hf_model_types=("llama",), config_from_hf=_llama_from_hf, hf_config=_llama_hf_config,
    reference_twin=_llama_twin, exchange_width=lambda c: 2 * c.kv_heads * c.head_dim)


for _entry in (VIT, BERT, GPT2_FAMILY, LLAMA):
    register_family(_entry)

__all__ = ["BERT", "GPT2_FAMILY", "LLAMA", "VIT"]
