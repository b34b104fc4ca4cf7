"""Plain transformers with the reference model's weights: the "one device, no edgeprism" baseline.

`transformers_twin(model)` builds `ViTModel` / `BertModel` / `GPT2Model` for the model's config and
copies our weights into it (the inverse of `models.loading.convert_hf_state_dict`, derived from it
tensor by tensor, so the two mappings cannot drift apart). Same process, same threads, same input:
the ratio local / transformers shows what edgeprism's local path costs on top of a plain forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edgeprism.models.base import Inputs, ReferenceModel
from edgeprism.models.loading import convert_hf_state_dict


def _hf_model(model: ReferenceModel):
    try:
        import transformers
    except ImportError:
        raise ValueError("the transformers strategy needs transformers: pip install transformers") from None
    c = model.config
    if c.family == "vit":
        if c.layerscale:
            raise ValueError(f"{c.name}: the transformers twin covers ViTModel, not DINOv2")
        config = transformers.ViTConfig(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                                        num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
                                        image_size=c.image_size, patch_size=c.patch_size,
                                        num_channels=c.num_channels, layer_norm_eps=c.layer_norm_eps,
                                        hidden_act=c.hidden_act, attn_implementation="sdpa")
        return transformers.ViTModel(config, add_pooling_layer=c.pooler == "dense_tanh")
    if c.family == "bert":
        config = transformers.BertConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                         num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                                         intermediate_size=c.intermediate_size, max_position_embeddings=c.max_positions,
                                         type_vocab_size=c.type_vocab_size, layer_norm_eps=c.layer_norm_eps,
                                         pad_token_id=c.pad_token_id, hidden_act=c.hidden_act,
                                         attn_implementation="sdpa")
        return transformers.BertModel(config, add_pooling_layer=c.pooler == "dense_tanh")
    config = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_positions, n_embd=c.hidden_size,
                                     n_layer=c.num_layers, n_head=c.num_heads, n_inner=c.intermediate_size,
                                     layer_norm_epsilon=c.layer_norm_eps, activation_function=c.hidden_act,
                                     attn_implementation="sdpa")
    return transformers.GPT2Model(config)


def transformers_twin(model: ReferenceModel):
    """A transformers model computing what `model` computes, with the same weights (eval, no grad).

    transformers 5 renames modules in memory but saves checkpoints under the classic names that
    `convert_hf_state_dict` reads, so the weights go through a checkpoint on disk: save a fresh model,
    overwrite each saved tensor with ours, load it back."""
    import tempfile

    from safetensors.torch import save_file

    from edgeprism.models.loading import read_checkpoint

    hf = _hf_model(model)
    ours = model.state_dict()
    with tempfile.TemporaryDirectory(prefix="edgeprism-twin-") as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        _, saved = read_checkpoint(tmp)
        for name, tensor in saved.items():
            mapped = convert_hf_state_dict(model.config, {name: tensor})
            if not mapped:
                continue  # buffers transformers keeps for itself (position ids, causal masks)
            # GPT-2's fused c_attn maps to query, key, value stacked (and Conv1D-transposed)
            source = torch.cat([ours[n] for n in mapped], dim=0)
            conv1d = model.config.family == "gpt2" and ".h." in f".{name}" and source.dim() == 2  # (in, out)
            saved[name] = (source.T if conv1d else source).contiguous().clone()
        save_file(saved, f"{tmp}/model.safetensors", metadata={"format": "pt"})
        hf = type(hf).from_pretrained(tmp, attn_implementation="sdpa")
    return hf.requires_grad_(False).eval()


def transformers_forward(hf, inputs: Inputs) -> Tensor:
    """The transformers forward the benchmark times; returns the last hidden state."""
    with torch.no_grad():
        return hf(**inputs).last_hidden_state


__all__ = ["transformers_twin", "transformers_forward"]
