"""Each reference model equals transformers' model with the same (random) weights, to 1e-5 (fp32)."""

import pytest
import torch

from edgeprism.models.loading import build_model, load_checkpoint

transformers = pytest.importorskip("transformers")
TOLERANCE = 1e-5


def _randomize_hf(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.02
            is_scale = ("norm" in name.lower() and name.endswith("weight")) or name.endswith("lambda1")
            param.copy_(1.0 + 5 * noise if is_scale else noise)
    return model.eval()


def _save(model, tmp_path):
    model.save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path


def test_vit_matches_transformers(tmp_path):
    hf_config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, image_size=32, patch_size=8, layer_norm_eps=1e-12,
                                       attn_implementation="eager")
    hf = _randomize_hf(transformers.ViTModel(hf_config))
    ours = load_checkpoint(build_model("vit-tiny-test"), _save(hf, tmp_path))
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=pixels)
        got = ours({"pixel_values": pixels})
    assert (got["hidden"] - expected.last_hidden_state).abs().max() <= TOLERANCE
    assert (got["pooled"] - expected.pooler_output).abs().max() <= TOLERANCE


def test_dinov2_matches_transformers_with_interpolated_positions(tmp_path):
    # A 6x6 stored position grid used at 4x4 patches: exercises the bicubic interpolation and LayerScale.
    hf_config = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
                                          image_size=42, patch_size=7, layer_norm_eps=1e-6,
                                          attn_implementation="eager")
    hf = _randomize_hf(transformers.Dinov2Model(hf_config))
    ours = load_checkpoint(build_model("dinov2-tiny-test"), _save(hf, tmp_path))
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = hf(pixel_values=pixels)
        got = ours({"pixel_values": pixels})
    assert (got["hidden"] - expected.last_hidden_state).abs().max() <= TOLERANCE
    assert (got["pooled"] - expected.pooler_output).abs().max() <= TOLERANCE


def test_bert_matches_transformers_with_padding(tmp_path):
    hf_config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, max_position_embeddings=128,
                                        attn_implementation="eager")
    hf = _randomize_hf(transformers.BertModel(hf_config))
    ours = load_checkpoint(build_model("bert-tiny-test"), _save(hf, tmp_path))
    ids = torch.randint(0, 1000, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 7:] = 0
    types = torch.zeros_like(ids)
    types[:, 10:] = 1
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        got = ours({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    valid = mask.bool()
    # Padding rows' hidden states are not defined by either model's contract; compare real tokens.
    assert (got["hidden"] - expected.last_hidden_state)[valid].abs().max() <= TOLERANCE
    assert (got["pooled"] - expected.pooler_output).abs().max() <= TOLERANCE


def test_gpt2_matches_transformers(tmp_path):
    hf_config = transformers.GPT2Config(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4, n_inner=256,
                                        attn_implementation="eager")
    hf = _randomize_hf(transformers.GPT2LMHeadModel(hf_config))
    ours = load_checkpoint(build_model("gpt2-tiny-test"), _save(hf, tmp_path))
    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        expected = hf(input_ids=ids, output_hidden_states=True)
        got = ours({"input_ids": ids})
    assert (got["hidden"] - expected.hidden_states[-1]).abs().max() <= TOLERANCE
    assert (got["logits_last"] - expected.logits[:, -1]).abs().max() <= 1e-4  # vocab-sized dot products


def test_checkpoint_shape_mismatch_is_refused(tmp_path):
    hf_config = transformers.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=128)
    _save(transformers.BertModel(hf_config), tmp_path)
    with pytest.raises(ValueError, match="does not match the config"):
        load_checkpoint(build_model("bert-tiny-test"), tmp_path)


def test_missing_checkpoint_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(build_model("bert-tiny-test"), tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_checkpoint(build_model("bert-tiny-test"), tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="none of model.safetensors"):
        load_checkpoint(build_model("bert-tiny-test"), tmp_path)
