"""Plain transformers with the reference model's weights: the "one device, no edgeprism" baseline.

`transformers_twin(model)` builds `ViTModel` / `BertModel` / `GPT2Model` / `LlamaModel` for the model's config and
copies our weights into it (the inverse of `models.loading.convert_hf_state_dict`, derived from it
tensor by tensor, so the two mappings cannot drift apart). Same process, same threads, same input:
the ratio local / transformers shows what edgeprism's local path costs on top of a plain forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edgeprism.models.base import Inputs, ReferenceModel
from edgeprism.models.loading import convert_hf_state_dict, read_checkpoint
from edgeprism.models.registry import get_family


def _hf_model(model: ReferenceModel):
    """The family's randomly initialised transformers model (`FamilyEntry.reference_twin`)."""
    make = get_family(model.config.family).reference_twin
    if make is None:
        raise ValueError(f"{model.config.name}: family {model.config.family!r} has no transformers twin")
    return make(model.config)


def transformers_twin(model: ReferenceModel):
    """A transformers model computing what `model` computes, with the same weights (eval, no grad).

    transformers 5 renames modules in memory but saves checkpoints under the classic names that
    `convert_hf_state_dict` reads, so the weights go through a checkpoint on disk: save a fresh model,
    overwrite each saved tensor with ours, load it back."""
    import tempfile

    from safetensors.torch import save_file

    hf = _hf_model(model)
    ours = model.state_dict()
    names = get_family(model.config.family).checkpoint
    assert names is not None  # a family with a twin has checkpoint names
    with tempfile.TemporaryDirectory(prefix="edgeprism-twin-") as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        _, saved = read_checkpoint(tmp)
        for name, tensor in saved.items():
            mapped = convert_hf_state_dict(model.config, {name: tensor})
            if not mapped:
                continue  # buffers transformers keeps for itself (position ids, causal masks)
            # a fused projection (GPT-2's c_attn) maps to query, key, value stacked (and Conv1D-transposed)
            source = torch.cat([ours[n] for n in mapped], dim=0)
            in_layer = f".{names.layer_prefix}" in f".{name}"
            conv1d = names.conv1d and in_layer and source.dim() == 2  # (in, out)
            saved[name] = (source.T if conv1d else source).contiguous().clone()
        save_file(saved, f"{tmp}/model.safetensors", metadata={"format": "pt"})
        hf = type(hf).from_pretrained(tmp, attn_implementation="sdpa")
    return hf.requires_grad_(False).eval()


def transformers_forward(hf, inputs: Inputs) -> Tensor:
    """The transformers forward the benchmark times; returns the last hidden state."""
    with torch.no_grad():
        return hf(**inputs).last_hidden_state


__all__ = ["transformers_forward", "transformers_twin"]
