"""A codec of another shape, registered from this file (one class + one `register_codec` line), is costed
by what it really sends: the cost model asks it for its vector count, and the bytes it charges equal the
bytes the transport counts over the loopback group."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from edgeprism.comm.loopback import LoopbackGroup
from edgeprism.compress import Codec, get_codec
from edgeprism.compress.base import ValueCodec, WireSpec, check_inputs
from edgeprism.compress.formats import FloatFormat
from edgeprism.compress.registry import register_codec
from edgeprism.models.loading import build_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.partition.transform import PositionWise
from edgeprism.plan import LinkEstimate, Plan, Request, predict
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.profile.schema import CodecFidelity


@dataclass(frozen=True)
class TripleMeansCodec(ValueCodec):
    """n // 3 means of consecutive token triples, then the mean of the 0-2 leftover tokens and one
    always-empty slot: n // 3 + 2 vectors, which `extra + ceil(n / ratio)` gets wrong when 3 ∤ n."""

    values: FloatFormat = FloatFormat()  # noqa: RUF009 - a frozen value, the same for every instance
    ratio = 3
    extra_vectors = 2

    @property
    def name(self) -> str:
        return "triple-means"

    def num_vectors(self, num_tokens: int) -> int:
        return num_tokens // 3 + 2

    def wire_spec(self, batch: int, num_tokens: int, hidden_size: int) -> WireSpec:
        slots = self.num_vectors(num_tokens)
        return [*self.values.wire_spec(batch, slots, hidden_size), ((batch, slots), torch.float32)]

    def encode(self, hidden: Tensor, valid: Tensor, anchor: Tensor | None = None) -> list[Tensor]:
        check_inputs(hidden, valid, anchor, self.name)
        batch, n, d = hidden.shape
        weight = valid.to(torch.float32)[..., None]  # (B, n, 1)
        x = hidden.to(torch.float32) * weight
        whole = 3 * (n // 3)
        sums = torch.cat([x[:, :whole].reshape(batch, n // 3, 3, d).sum(2), x[:, whole:].sum(1, keepdim=True),
                          x.new_zeros(batch, 1, d)], dim=1)  # (B, n // 3 + 2, d)
        counts = torch.cat([weight[:, :whole].reshape(batch, n // 3, 3).sum(2), weight[:, whole:, 0].sum(1)[:, None],
                            weight.new_zeros(batch, 1)], dim=1)  # (B, n // 3 + 2)
        return [*self.values.encode(sums / counts.clamp_min(1.0)[..., None]), counts]


register_codec("triple-means", TripleMeansCodec)


def test_the_registered_codec_fits_the_protocol():
    codec = get_codec("triple-means")
    assert isinstance(codec, Codec) and codec == TripleMeansCodec() and str(codec) == "triple-means"
    hidden, valid = torch.randn(2, 13, 8), torch.ones(2, 13, dtype=torch.bool)
    wire = codec.encode(hidden, valid)
    assert [(tuple(t.shape), t.dtype) for t in wire] == codec.wire_spec(2, 13, 8)
    vectors, counts = codec.decode(wire)
    assert vectors.shape == (2, 6, 8) and counts.sum() == 2 * 13
    assert codec.nbytes(2, 13, 8) == sum(t.numel() * t.element_size() for t in wire)


def test_the_cost_model_charges_the_codecs_vectors():
    profile = synthetic_profile("bert-tiny-test", world_size=2, codecs=(
        CodecFidelity.from_codec(get_codec("fp32"), 64), CodecFidelity.from_codec(TripleMeansCodec(), 64)))
    plan = Plan(mode="distributed", ranks=(0, 1), token_shares=(0.5, 0.5), token_counts=(13, 13),
                codec="triple-means", cr=3, wire_dtype="triple-means", predicted_latency_s=0.0, predicted_energy_j=0.0,
                energy_source="modelled", objective="latency", reason="test")
    got = predict(profile, Request("bert-tiny-test", 4, 26), plan, LinkEstimate(50e6, 3e-3))
    c = profile.compute
    layer_s = c.layer_seconds(4, 13, 13 + 13 // 3 + 2)  # own tokens + the other rank's n // 3 + 2 vectors
    assert got.compute_s == pytest.approx(profile.model.num_layers * layer_s + c.request_overhead_s)
    wrong_s = c.layer_seconds(4, 13, 13 + math.ceil(13 / 3) + 2)  # what extra + ceil(n / cr) would charge
    assert got.compute_s != pytest.approx(profile.model.num_layers * wrong_s + c.request_overhead_s)


@pytest.mark.parametrize("codec_name", ["triple-means", "sm4a+int8", "fp16"])
def test_charged_layer_bytes_equal_the_transports(codec_name):
    model = build_model("bert-tiny-test")
    num_tokens, batch = 24, 2  # 12 tokens per rank: whole triples and whole Segment Means segments
    inputs = synthetic_inputs(model.config, batch, seq_len=num_tokens, seed=5)

    def rank_fn(ctx, exchanger):
        PositionWise(model, ctx, get_codec(codec_name), exchanger=exchanger).forward(inputs if ctx.is_root else None)
        return exchanger.stats.per_kind_nbytes.get("layer", 0)

    sent = LoopbackGroup(2).run(rank_fn)
    entry = CodecFidelity.from_codec(get_codec(codec_name), model.config.hidden_size)
    profile = synthetic_profile("bert-tiny-test", world_size=2, codecs=(entry,))
    plan = Plan(mode="distributed", ranks=(0, 1), token_shares=(0.5, 0.5), token_counts=(12, 12), codec=entry.codec,
                cr=entry.cr, wire_dtype=entry.wire_dtype, predicted_latency_s=0.0, predicted_energy_j=0.0,
                energy_source="modelled", objective="latency", reason="test")
    predicted = predict(profile, Request("bert-tiny-test", batch, num_tokens), plan, LinkEstimate(50e6, 3e-3))
    setup_bytes = max(batch * profile.input_bytes_per_token * 12, batch * profile.output_bytes_per_row)
    # two ranks: each receives the other's message every layer, the busiest rank's layer bytes
    assert predicted.wire_bytes - setup_bytes == pytest.approx(max(sent))
    assert sent[0] == sent[1] == model.config.num_layers * get_codec(codec_name).nbytes(batch, 12, 64)


def test_registering_a_codec_checks_its_name_and_protocol():
    with pytest.raises(ValueError, match="names must agree"):
        register_codec("other-name", TripleMeansCodec)
    with pytest.raises(ValueError, match="unknown here"):
        CodecFidelity("no-such-codec", 1, "fp32", 1.0).num_vectors(4)
