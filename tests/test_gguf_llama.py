"""GGUF → LlamaForCausalLM folder (assets/gguf_llama.py) on a tiny llama GGUF written here, no real asset needed.

The file is written the way llama.cpp's convert_hf_to_gguf.py writes one: from a random transformers
``LlamaForCausalLM``, Q/K rows permuted to llama.cpp's interleaved rotary order, byte-level BPE metadata. Converting
it back must give the original weights (exactly for F32 tensors, within the quantisation step for Q8_0/Q4_1), the
same tensors as transformers' own GGUF loader, and a tokenizer equal to transformers' GGUF tokenizer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeprism.assets import gguf_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

HEADS, KV_HEADS, HIDDEN, LAYERS, FFN = 4, 2, 64, 2, 96
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġa n", "Ġan d", "e r"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows → interleaved pairs."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]) \
        .swapaxes(1, 2).reshape(weight.shape)


def _byte_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return CONTROL + sorted(bytes_to_unicode().values()) + ["".join(m.split(" ")) for m in MERGES]


# quantisation per GGUF tensor-name suffix (F32 otherwise): the embedding as SmolLM2's file has it, one MLP matrix
_QUANT = {"token_embd.weight": gguf.GGMLQuantizationType.Q8_0, "ffn_up.weight": gguf.GGMLQuantizationType.Q4_1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(original HF model, path of its GGUF file, converted folder)."""
    torch.manual_seed(0)
    tokens = _byte_tokens()
    config = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=HIDDEN, intermediate_size=FFN,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5, rope_theta=50000.0,
                                      max_position_embeddings=256, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so a misplaced norm would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in CONTROL else 1 for t in tokens])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    to_gguf = {hf: gg for gg, hf in gguf_llama._GLOBAL_NAMES.items()}
    to_gguf.update({f"model.layers.{i}.{hf}": f"blk.{i}.{gg}" for i in range(LAYERS)
                    for gg, hf in gguf_llama._LAYER_NAMES.items()})
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight
        weight = tensor.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            weight = _llama_cpp_permute(weight, HEADS)
        elif name.endswith("k_proj.weight"):
            weight = _llama_cpp_permute(weight, KV_HEADS)
        gname = to_gguf[name]
        qtype = next((q for suffix, q in _QUANT.items() if gname.endswith(suffix)), None)
        if qtype is None:
            writer.add_tensor(gname, weight)
        else:
            writer.add_tensor(gname, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    folder = tmp_path_factory.mktemp("folder")
    gguf_llama.write_llama_folder(path, folder)
    return model, path, folder


def test_unpermute_inverts_llama_cpp_permutation():
    weight = np.arange(6 * 16 * 5, dtype=np.float32).reshape(6 * 16, 5)
    for heads in (1, 2, 6):
        assert np.array_equal(gguf_llama.unpermute_rotary(_llama_cpp_permute(weight, heads), heads), weight)
    with pytest.raises(ValueError, match="96 rows cannot hold 64 heads"):
        gguf_llama.unpermute_rotary(weight, 64)


def test_round_trip_gives_the_original_weights_and_logits(tiny):
    model, _, folder = tiny
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["num_key_value_heads"], config["head_dim"]) == ("llama", KV_HEADS, 16)
    assert (config["rope_theta"], config["rms_norm_eps"], config["tie_word_embeddings"]) == (50000.0, 1e-5, True)
    ours = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    original, converted = model.state_dict(), ours.state_dict()
    assert set(original) == set(converted)
    for name, tensor in original.items():
        if "embed_tokens" in name or "lm_head" in name or "up_proj" in name:  # quantised: within one step
            step = tensor.abs().amax(dim=-1, keepdim=True) / (127 if "up_proj" not in name else 7.5)
            assert ((converted[name] - tensor).abs() <= step).all(), name
        else:
            assert torch.equal(converted[name], tensor), name  # F32, Q/K unpermuted exactly
    ids = torch.randint(0, config["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        drift = (ours(ids).logits - model(ids).logits).abs().max().item()
    assert drift < 0.05  # only the Q8_0 embedding / Q4_1 up-projection rounding


def test_weights_equal_transformers_gguf_loader(tiny):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    _, path, folder = tiny
    ours = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=ours)["tensors"]
    converted = ours.state_dict()
    assert set(theirs) | {"lm_head.weight"} == set(converted)
    for name, tensor in theirs.items():
        assert torch.equal(converted[name], tensor), name


def test_tokenizer_equals_transformers_gguf_tokenizer(tiny):
    _, path, folder = tiny
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    for text in ["the and other", "<|im_start|>user\nthe answer<|im_end|>\n", "  Ünïcode 中文 🙂\tx", "year 2024"]:
        assert ours(text).input_ids == theirs(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == text
    assert ours(" the")["input_ids"] == [ours.convert_tokens_to_ids("Ġthe")]
    assert ours("42").input_ids == [ours.convert_tokens_to_ids("4"), ours.convert_tokens_to_ids("2")]
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_what_is_not_a_plain_llama_is_refused():
    with pytest.raises(ValueError, match="'gpt2'"):
        gguf_llama.llama_config({"general.architecture": "gpt2"}, tied=True)
    with pytest.raises(ValueError, match="'blk.0.attn_qkv.weight'"):
        gguf_llama.hf_tensor_name("blk.0.attn_qkv.weight")
    assert gguf_llama.hf_tensor_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    with pytest.raises(ValueError, match="'llama'"):
        gguf_llama.gguf_tokenizer_json({"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="'default' is not built"):
        gguf_llama.gguf_tokenizer_json({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default"})
