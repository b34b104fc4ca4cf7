"""The built-in families' registry entries: ViT (and DINOv2), BERT, GPT-2.

Each entry gathers what used to be spread over the code as `if family == ...`: the model class, the
modality and causality, the request keys, the synthetic-input maker, the transformers checkpoint names
and config.json fields (both directions), and the transformers twin the tests and benchmarks compare
against. `models/__init__.py` imports this module, so the entries exist whenever any model does.
"""

from __future__ import annotations

from edgeprism.models.bert import TEXT_KEYS, Bert
from edgeprism.models.config import ModelConfig
from edgeprism.models.gpt2 import GPT2
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


def _bert_from_hf(hf_config: dict, name: str) -> ModelConfig:
    return ModelConfig(name, "bert", hidden_size=hf_config["hidden_size"], num_layers=hf_config["num_hidden_layers"],
                       num_heads=hf_config["num_attention_heads"], hidden_act=hf_config.get("hidden_act", "gelu"),
                       intermediate_size=hf_config["intermediate_size"],
                       layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12), vocab_size=hf_config["vocab_size"],
                       max_positions=hf_config["max_position_embeddings"],
                       type_vocab_size=hf_config.get("type_vocab_size", 2),
                       pad_token_id=hf_config.get("pad_token_id", 0))


def _bert_hf_config(c: ModelConfig) -> dict:
    return {"model_type": "bert", "architectures": ["BertModel"], **_encoder_hf_common(c), "vocab_size": c.vocab_size,
            "max_position_embeddings": c.max_positions, "type_vocab_size": c.type_vocab_size,
            "pad_token_id": c.pad_token_id}


def _bert_twin(c: ModelConfig):
    transformers = _transformers()
    config = transformers.BertConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                     num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                                     intermediate_size=c.intermediate_size, max_position_embeddings=c.max_positions,
                                     type_vocab_size=c.type_vocab_size, layer_norm_eps=c.layer_norm_eps,
                                     pad_token_id=c.pad_token_id, hidden_act=c.hidden_act,
                                     attn_implementation="sdpa")
    return transformers.BertModel(config, add_pooling_layer=c.pooler == "dense_tanh")


BERT = FamilyEntry(
    "bert", Bert, modality="text", causal=False, input_keys=("input_ids", *sorted(TEXT_KEYS - {"input_ids"})),
    synthetic_inputs=text_inputs_with_types, pipeline_keys=("input_ids", "token_type_ids"),
    checkpoint=CheckpointNames(
        "encoder.layer.",
        {"embeddings.word_embeddings": "word_embeddings", "embeddings.position_embeddings": "position_embeddings",
         "embeddings.token_type_embeddings": "token_type_embeddings", "embeddings.LayerNorm": "embed_norm",
         "pooler.dense": "pooler"},
        _bert_layers),
    hf_model_types=("bert",), config_from_hf=_bert_from_hf, hf_config=_bert_hf_config, reference_twin=_bert_twin)


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


for _entry in (VIT, BERT, GPT2_FAMILY):
    register_family(_entry)

__all__ = ["BERT", "GPT2_FAMILY", "VIT"]
