"""The Llama-family reference decoder equals transformers' LlamaForCausalLM with the same random weights
(<= 1e-4 fp32 on logits), for tied and untied heads and each rotary scaling it reads; configs round-trip."""

import pytest
import torch

from edgeprism.models.config import ModelConfig, get_config
from edgeprism.models.families import LLAMA
from edgeprism.models.loading import load_pretrained
from edgeprism.models.registry import get_family

transformers = pytest.importorskip("transformers")
TOLERANCE = 1e-4


def _randomize_hf(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.02
            param.copy_(1.0 + 5 * noise if "norm" in name and name.endswith("weight") else noise * 5)
    return model.eval()


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize(("rope", "tied"), [("default", True), ("linear", False), ("llama3", False)])
def test_llama_matches_transformers(tmp_path, rope, tied):
    hf_config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                         rms_norm_eps=1e-5, rope_parameters=ROPES[rope], tie_word_embeddings=tied,
                                         attn_implementation="eager")
    hf = _randomize_hf(transformers.LlamaForCausalLM(hf_config))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_pretrained(tmp_path, "llama-test")
    assert ours.config.rope_type == rope and ours.config.tie_word_embeddings == tied and ours.config.kv_heads == 2
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # right padding: positions stay 0..T-1 in both
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours({"input_ids": ids, "attention_mask": mask})
        logits = ours.logits(got["hidden"])  # (B, T, vocab)
    valid = mask.bool()
    assert (logits - expected)[valid].abs().max() <= TOLERANCE
    assert (got["logits_last"][0] - expected[0, -1]).abs().max() <= TOLERANCE


def test_unsupported_rope_scaling_is_named():
    hf = LLAMA.hf_config(get_config("llama-tiny"))
    hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(ValueError, match="'yarn'"):
        LLAMA.config_from_hf(hf, "x")
    with pytest.raises(ValueError, match="'dynamic'"):
        ModelConfig("x", "llama", hidden_size=64, num_layers=1, num_heads=8, intermediate_size=8,
                    rope_type="dynamic")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["llama-tiny", "smollm2-135m"])
def test_llama_config_round_trips_through_config_json(name):
    config = get_config(name)
    entry = get_family("llama")
    assert entry.config_from_hf(entry.hf_config(config), name) == config


def test_smollm2_preset_and_exchange_width():
    config = get_config("smollm2-135m")
    assert (config.num_layers, config.hidden_size, config.num_heads, config.kv_heads) == (30, 576, 9, 3)
    assert config.exchange_width == 2 * 3 * 64 == 384  # grouped K/V, narrower than d = 576
    assert get_config("gpt2-124m").exchange_width == 768


def test_new_fields_leave_older_presets_hashes_alone():
    # Recorded before the Llama fields existed; profiles on disk carry these hashes.
    assert get_config("gpt2-124m").config_hash() == "c340021a3707d25e"
    assert get_config("minilm-l6").config_hash() == "586a17925e97b4b1"
    assert get_config("dinov2-s14").config_hash() == "d61e9be0bf577726"
