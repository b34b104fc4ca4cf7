"""The Llama-family reference decoder equals transformers' LlamaForCausalLM with the same random weights
(<= 1e-4 fp32 on logits), for tied and untied heads and each rotary scaling it reads; configs round-trip."""

import dataclasses

import pytest
import torch

from edgeprism.comm.loopback import LoopbackGroup
from edgeprism.compress import get_codec
from edgeprism.models.config import ModelConfig, get_config
from edgeprism.models.families import LLAMA
from edgeprism.models.loading import build_model, load_pretrained
from edgeprism.models.registry import get_family, register_family
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.partition.ranges import split_tokens
from edgeprism.partition.transform import PositionWise
from edgeprism.plan import LinkEstimate, Request, choose_plan
from edgeprism.plan.accounting import exchange_cost, layer_flops
from edgeprism.plan.synthetic import synthetic_profile

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


def _position_wise(model, inputs, shares, codec):
    """Rank 0's outputs and the layer bytes every rank sent, over the loopback transport."""

    def rank_fn(ctx, exchanger):
        engine = PositionWise(model, ctx, get_codec(codec), exchanger=exchanger)
        out = engine.forward(inputs if ctx.is_root else None, shares, gather_hidden=True)
        return out, exchanger.stats.per_kind_nbytes.get("layer", 0)

    results = LoopbackGroup(len(shares)).run(rank_fn)
    return results[0][0], sum(r[1] for r in results)


@pytest.mark.parametrize("codec", ["fp32", "sm4a+int8", "int8c"])
def test_kv_exchange_is_charged_what_crosses_the_wire(codec):
    model = build_model("llama-tiny", seed=3)
    config, shares = model.config, (0.5, 0.2, 0.3)
    inputs = synthetic_inputs(config, 2, seq_len=30, seed=7)
    got, sent = _position_wise(model, inputs, shares, codec)
    counts = [r.num_tokens for r in split_tokens(30, shares)]
    cost = exchange_cost(config, counts, codec, batch=2, flow="to_higher_ranks")
    assert sent == sum(cost.received_bytes_per_rank) * config.num_layers  # each message once per later rank
    # K/V of the grouped heads: 2 x 2 heads x 8 = 32 features per token, half the hidden size
    assert config.exchange_width == 32 == config.hidden_size // 2
    assert cost.message_bytes_per_rank[0] == get_codec(codec).nbytes(2, counts[0], 32)
    with torch.no_grad():
        reference = model(inputs)
    error = float((got["hidden"] - reference["hidden"]).abs().max())
    assert error <= 1e-5 if codec == "fp32" else 0.0 < error < 1.0


def test_receivers_project_no_kv_for_received_vectors():
    # The FLOP count follows the contract: received rows arrive as keys/values (only scores grow with them).
    llama, gpt2 = get_config("llama-tiny"), get_config("gpt2-tiny-test")
    assert layer_flops(llama, 10, 5) - layer_flops(llama, 10, 0) == 2 * 2 * 10 * 5 * llama.hidden_size
    assert layer_flops(gpt2, 10, 5) - layer_flops(gpt2, 10, 0) == 2 * 2 * 5 * 64 * 64 + 2 * 2 * 10 * 5 * 64


def test_planner_costs_smollm2_at_its_kv_width():
    profile = synthetic_profile("smollm2-135m", world_size=2)
    fp32 = next(c for c in profile.codecs if c.codec == "fp32")
    assert fp32.wire_bytes_per_token == 4.0 * 384 + 1  # K/V floats and a count, not 576 floats
    plan = choose_plan(profile, Request("smollm2-135m", 1, 512), LinkEstimate(50e6, 3e-3))
    assert plan.token_counts and sum(plan.token_counts) == 512


def test_a_kv_width_the_family_entry_does_not_declare_is_refused():
    # The cost model charges the entry's width; a block sending another width must not build.
    register_family(dataclasses.replace(LLAMA, name="llama-undeclared", exchange_width=None))
    config = ModelConfig("llama-undeclared-tiny", "llama-undeclared", hidden_size=64, num_layers=1, num_heads=8,
                         num_kv_heads=2, intermediate_size=8, vocab_size=10, max_positions=16)
    with pytest.raises(ValueError, match="sends 32 features per token .* exchange_width 64"):
        build_model(config)
