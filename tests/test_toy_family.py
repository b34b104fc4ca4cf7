"""A model family added from outside the package, touching no edgeprism file (docs/ADDING.md).

The toy family is defined and registered here: a model class built from `models/common.py` blocks, a
registry entry, and presets. It then runs through what `edgeprism run` does (the CLI's checks, the
position-wise transform over the loopback transport, exact against the single-device reference), the
planner on a synthetic profile, the profile's JSON round trip and the profiler's helpers. A decoder
twin of the family (same class, `causal=True` in its entry) shows that causality comes from the
entry alone: the transform masks and sends forward only, and the cost model charges one hop per layer.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import Tensor, nn

from edgeprism.cli.run import validate as validate_run_args
from edgeprism.comm.loopback import LoopbackGroup
from edgeprism.compress import get_codec
from edgeprism.models.base import Block, Inputs, ReferenceModel, check_blocks
from edgeprism.models.common import PreNormBlock
from edgeprism.models.config import ModelConfig, register
from edgeprism.models.loading import build_model
from edgeprism.models.registry import FamilyEntry, get_family, register_family
from edgeprism.models.synthetic import synthetic_inputs, text_inputs
from edgeprism.partition.transform import PositionWise
from edgeprism.plan import LinkEstimate, Plan, Request, choose_plan, predict
from edgeprism.plan.cost import message_rounds
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.profile.compute import overhead_call
from edgeprism.profile.profiler import ProfileOptions, input_bytes_per_token, token_counts_for
from edgeprism.profile.schema import Profile


class ToyText(ReferenceModel):
    """Token embeddings + learned positions, pre-LN blocks, final norm; no head beyond the base's."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.positions = nn.Embedding(config.max_positions, d)
        self.blocks = nn.ModuleList(PreNormBlock(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def validate_input(self, inputs: Inputs) -> int:
        if "input_ids" not in inputs or not set(inputs) <= {"input_ids", "attention_mask"}:
            raise ValueError(f"{self.config.name} takes input_ids [+ attention_mask], got {sorted(inputs)}")
        return inputs["input_ids"].shape[1]

    def split_input(self, inputs: Inputs, token_start: int, token_end: int) -> Inputs:
        return {k: v[:, token_start:token_end].contiguous() for k, v in inputs.items()}

    def embed(self, part: Inputs, token_start: int, token_end: int) -> Tensor:
        positions = torch.arange(token_start, token_end)
        return self.embed_tokens(part["input_ids"]) + self.positions(positions)  # (B, n_own, d)

    def finish(self, hidden: Tensor) -> Tensor:
        return self.norm(hidden)


# Registered at import, from this file only: the whole of "adding a family" for a family whose blocks fit.
register_family(FamilyEntry("toy", ToyText, modality="text", causal=False, input_keys=("input_ids", "attention_mask"),
                            synthetic_inputs=text_inputs))
register_family(FamilyEntry("toy-decoder", ToyText, modality="text", causal=True,
                            input_keys=("input_ids", "attention_mask"), synthetic_inputs=text_inputs))
TOY = register(ModelConfig("toy-tiny-test", "toy", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                           vocab_size=50, max_positions=64, pooler="none"))
TOY_DECODER = register(ModelConfig("toy-decoder-tiny-test", "toy-decoder", hidden_size=32, num_layers=2, num_heads=4,
                                   intermediate_size=64, vocab_size=50, max_positions=64, pooler="none"))


def _run_args(**overrides) -> argparse.Namespace:
    args = dict(model=TOY.name, checkpoint=None, world_size=2, shares=None, mode=None, batch=2, seq_len=20,
                image_size=None, padded=True, codec="fp32", size_aware=True, generate=0, compare_local=True,
                repeats=1, warmup=0, seed=0, timeout=60.0)
    args.update(overrides)
    return argparse.Namespace(**args)


def _position_wise(model: ReferenceModel, inputs: Inputs, world_size: int, codec: str = "fp32",
                   shares: tuple[float, ...] | None = None) -> tuple[dict, int]:
    """Rank 0's outputs and the layer bytes all ranks sent, over the loopback transport."""

    def rank_fn(ctx, exchanger):
        engine = PositionWise(model, ctx, get_codec(codec), exchanger=exchanger)
        engine.verify_peers()
        out = engine.forward(inputs if ctx.is_root else None, shares, gather_hidden=True)
        return out, exchanger.stats.per_kind_nbytes.get("layer", 0)

    results = LoopbackGroup(world_size).run(rank_fn)
    return results[0][0], sum(r[1] for r in results)


def test_the_family_is_declared_by_its_entry():
    assert TOY.causal is False and TOY.modality == "text" and TOY_DECODER.causal is True
    model = build_model(TOY)
    assert isinstance(model, ToyText) and model.causal is False and build_model(TOY_DECODER).causal is True
    assert all(isinstance(block, Block) for block in model.blocks)
    assert get_family("toy").stage_keys == ("input_ids",)


def test_the_run_path_checks_the_toy_request():
    spec = validate_run_args(_run_args())
    assert spec.model == TOY.name and spec.world_size == 2 and spec.padded
    with pytest.raises(ValueError, match="--image-size is for ViT models"):
        validate_run_args(_run_args(image_size=32, seq_len=None))
    with pytest.raises(ValueError, match="decoder model"):
        validate_run_args(_run_args(generate=2, padded=False))


@pytest.mark.parametrize("config, world_size, shares", [(TOY, 2, None), (TOY, 3, (0.5, 0.3, 0.2)),
                                                         (TOY_DECODER, 2, (0.6, 0.4)), (TOY_DECODER, 3, None)])
def test_position_wise_matches_the_single_device_reference(config, world_size, shares):
    model = build_model(config)
    inputs = synthetic_inputs(config, 2, seq_len=20, padded=not config.causal, seed=3)
    with torch.no_grad():
        reference = model(inputs)
    got, _ = _position_wise(model, inputs, world_size, shares=shares)
    valid = inputs.get("attention_mask", torch.ones(2, 20)).bool()
    assert (got["hidden"] - reference["hidden"])[valid].abs().max() <= 1e-5  # CR = 1: exact up to float order
    if not config.causal:
        assert (got["mean"] - reference["mean"]).abs().max() <= 1e-5


def test_a_compressing_codec_runs_and_sends_fewer_bytes():
    model = build_model(TOY)
    inputs = synthetic_inputs(TOY, 2, seq_len=24, seed=4)
    _, full_bytes = _position_wise(model, inputs, 2, "fp32")
    got, sm_bytes = _position_wise(model, inputs, 2, "sm4a+int8")
    assert sm_bytes < full_bytes / 3 and torch.isfinite(got["hidden"]).all()


def test_planner_and_profile_take_the_toy_family():
    link = LinkEstimate(50e6, 3e-3)
    for config in (TOY, TOY_DECODER):
        profile = synthetic_profile(config.name, world_size=3)
        assert Profile.from_json(profile.to_json()) == profile
        assert profile.input_bytes_per_token == 8.0  # a text family: int64 ids
        assert profile.output_bytes_per_row == (4.0 * config.hidden_size if config.causal else 0.0)
        request = Request(config.name, 8, 48)
        plan = choose_plan(profile, request, link)
        assert plan.mode in ("local", "distributed") and sum(plan.token_counts) == 48
        distributed = Plan(mode="distributed", ranks=(0, 1, 2), token_shares=(1 / 3,) * 3, token_counts=(16, 16, 16),
                             codec="fp32", cr=1, wire_dtype="float32", predicted_latency_s=0.0,
                             predicted_energy_j=0.0, energy_source="modelled", objective="latency", reason="test")
        prediction = predict(profile, request, distributed, link)
        # the decoder's exchange is one forward hop per layer; the encoder's all-gather rings k - 1 hops
        rounds = message_rounds(config.num_layers, 3, config.causal)
        assert prediction.latency_s == pytest.approx(rounds * link.latency_s)
    assert message_rounds(2, 3, True) < message_rounds(2, 3, False)


def test_profiler_helpers_take_the_toy_family():
    model = build_model(TOY)
    assert token_counts_for(TOY, ProfileOptions(model=TOY.name, seq_lens=(8, 32))) == (8, 32)
    with pytest.raises(ValueError, match="--image-size is for ViT models"):
        token_counts_for(TOY, ProfileOptions(model=TOY.name, image_size=32))
    assert input_bytes_per_token(model, 32, 2, None) == 8.0  # one int64 id per token
    overhead_call(model, 2, 16, torch.device("cpu"))()


def test_contract_violations_are_named():
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        get_family("nope")
    with pytest.raises(ValueError, match="modality"):
        FamilyEntry("bad", ToyText, modality="audio", causal=False, input_keys=("x",),  # type: ignore[arg-type]
                    synthetic_inputs=text_inputs)

    class NoKV(nn.Module):
        def forward(self, x):
            return x

    model = build_model(TOY)
    model.blocks[1] = NoKV()
    with pytest.raises(ValueError, match="block 1 .*lacks kv_input, attn"):
        check_blocks(model)
    with pytest.raises(ValueError, match="has no language-model head"):
        build_model(TOY).logits(torch.zeros(1, 32))
