"""Low-bit formats with outliers and rotation, the packed-mask codec, delta coding across layers."""

from __future__ import annotations

import pytest
import torch

from edgeprism.comm.loopback import LoopbackGroup
from edgeprism.compress import get_codec, pack, spec_nbytes, unpack
from edgeprism.compress.delta import DeltaCodec
from edgeprism.compress.lowbit import LowBitFormat, PackedMaskCodec, pack_bits, rotation_matrix, unpack_bits
from edgeprism.models.loading import build_model
from edgeprism.models.synthetic import pads_rows, synthetic_inputs
from edgeprism.partition.transform import PositionWise

SIZES = [(1, 1, 8), (1, 7, 5), (2, 13, 70), (3, 16, 64), (2, 9, 33)]
NAMES = ["lb3", "lb2o4r", "lb3o4r", "lb4o2", "lb5o1r", "lb8o4", "sm2a+lb3o4r", "sm4+lb8"]


def _inputs(batch: int, n: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, n, d, generator=gen)
    hidden[..., d // 2] += 12.0  # an outlier channel, as in BERT-family residual streams
    valid = torch.ones(batch, n, dtype=torch.bool)
    for b in range(1, batch):
        valid[b, max(1, n - 2 * b):] = False
    return hidden, valid


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_round_trips(bits: int) -> None:
    codes = torch.randint(0, 2 ** bits, (3, 5, 37))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == -(-37 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 37), codes)


def test_rotation_is_orthogonal_and_deterministic() -> None:
    r = rotation_matrix(48)
    assert torch.allclose(r @ r.T, torch.eye(48), atol=1e-5)
    assert torch.equal(r, rotation_matrix(48))


@pytest.mark.parametrize("name", NAMES + ["delta:lb8o4:lb3o4r", "delta:int8"])
@pytest.mark.parametrize("size", SIZES)
def test_wire_matches_spec_bytes_and_padding_tolerant(name: str, size) -> None:
    codec = get_codec(name)
    assert get_codec(codec.name) == codec
    hidden, valid = _inputs(*size)
    wire = codec.encode(hidden, valid, None)
    spec = codec.wire_spec(*size)
    assert [(tuple(t.shape), t.dtype) for t in wire] == [(tuple(s), dt) for s, dt in spec]
    assert codec.nbytes(*size) == spec_nbytes(spec) == sum(t.numel() * t.element_size() for t in wire)
    buffer = torch.cat([pack(wire), torch.full((11,), 255, dtype=torch.uint8)])  # receivers pad
    vectors, counts = codec.decode(unpack(buffer, spec))
    assert vectors.dtype == torch.float32 and vectors.shape[0] == size[0] and vectors.shape[-1] == size[2]
    if not name.startswith("sm"):
        assert torch.equal(counts, valid.to(torch.float32))


@pytest.mark.parametrize("bits, bound", [(2, 0.15), (3, 0.05), (4, 0.015), (8, 1e-3)])
def test_low_bit_error_is_relative_to_the_non_outlier_part(bits: int, bound: float) -> None:
    hidden, _ = _inputs(2, 32, 128)
    fmt = LowBitFormat(bits, outliers=2, rotate=True)
    decoded = fmt.decode(fmt.encode(hidden))
    relative = float((decoded - hidden).pow(2).mean() / hidden.pow(2).mean())
    assert relative < bound
    # the outlier channel is carried in fp16, so it survives almost exactly
    assert torch.allclose(decoded[..., 64], hidden[..., 64], atol=2e-2)


def test_outliers_help_and_bytes_are_as_documented() -> None:
    hidden, _valid = _inputs(1, 64, 384)
    plain, with_outliers = LowBitFormat(3), LowBitFormat(3, outliers=4)
    err = [float((f.decode(f.encode(hidden)) - hidden).pow(2).mean()) for f in (plain, with_outliers)]
    assert err[1] < err[0] / 3
    codec = PackedMaskCodec(LowBitFormat(3, 4, rotate=True))
    assert codec.nbytes(1, 64, 384) == 64 * (144 + 2 + 16) + 2 + 8


def test_fingerprint_ignores_the_rotation_cache() -> None:
    from edgeprism.compress import codec_fingerprint

    codec = get_codec("delta:lb8o4:lb3o4r")
    before = codec_fingerprint(codec)
    codec.encode(torch.randn(1, 4, 16), torch.ones(1, 4, dtype=torch.bool))
    codec.rest.decode(codec.rest.encode(torch.randn(1, 4, 16)))  # fills the rotation cache
    assert codec_fingerprint(codec) == before and "LowBitFormat(bits=3,outliers=4,rotate=True)" in before


def test_bad_names_raise() -> None:
    with pytest.raises(ValueError, match="2..8"):
        get_codec("lb9")
    with pytest.raises(ValueError, match="delta:FIRST:REST"):
        get_codec("delta:")
    with pytest.raises(ValueError, match="unknown format 'fp8'"):
        get_codec("delta:fp8")


def test_delta_session_error_does_not_accumulate() -> None:
    """Closed loop: after many layers, the receiver's error is one residual's quantisation error."""
    gen = torch.Generator().manual_seed(3)
    codec = DeltaCodec(LowBitFormat(8, 4), LowBitFormat(3, 4, rotate=True))
    sender, receiver = codec.session(), codec.session()
    hidden = torch.randn(2, 16, 64, generator=gen)
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, 12:] = False
    errors = []
    for layer in range(12):
        spec = sender.wire_spec(layer, 2, 16, 64)
        wire = sender.encode(layer, hidden, valid)
        assert [(tuple(t.shape), t.dtype) for t in wire] == spec
        vectors, counts = receiver.decode(layer, 1, unpack(pack(wire), spec))
        assert torch.equal(vectors, sender.own) and torch.equal(counts, valid.float())
        errors.append(float(((vectors - hidden) * valid.unsqueeze(-1)).pow(2).mean() / hidden.pow(2).mean()))
        hidden = hidden + 0.4 * torch.randn(2, 16, 64, generator=gen)  # the next layer's states
    assert max(errors[1:]) < 0.02  # 3-bit on a residual ~0.4x the state: far below 3-bit on the state
    with pytest.raises(AssertionError):
        receiver.decode(20, 1, wire)


@pytest.mark.parametrize("model_name, world", [("bert-tiny-test", 2), ("gpt2-tiny-test", 3)])
def test_delta_runs_through_the_transform_close_to_reference(model_name: str, world: int) -> None:
    model = build_model(model_name, seed=5)
    inputs = synthetic_inputs(model.config, 2, seq_len=24, padded=pads_rows(model.config), seed=7)
    with torch.no_grad():
        reference = model(inputs)["hidden"]

    def run(codec_name: str):
        group = LoopbackGroup(world)

        def rank_fn(ctx, exchanger):
            engine = PositionWise(model, ctx, get_codec(codec_name), exchanger=exchanger)
            out = engine.forward(inputs if ctx.is_root else None, gather_hidden=True)
            return out, exchanger.stats.per_kind_nbytes.get("layer", 0)

        results = group.run(rank_fn)
        return results[0][0]["hidden"], sum(r[1] for r in results)

    delta_hidden, delta_bytes = run("delta:lb8o4:lb3o4r")
    keyframe_hidden, keyframe_bytes = run("lb3o4r")  # stateless, same per-token size as the deltas
    exact_hidden, _ = run("delta:fp32")  # fp32 residuals: exact reconstruction
    assert torch.allclose(exact_hidden, reference, atol=1e-4)
    err_delta = float((delta_hidden - reference).pow(2).mean())
    err_plain = float((keyframe_hidden - reference).pow(2).mean())
    assert err_delta < err_plain
    assert delta_bytes > keyframe_bytes  # the 8-bit key frame costs more than one 3-bit layer


@pytest.mark.parametrize("name", ["delta:lb8o4:lb3o4r", "delta:int8:lb3*2:int4", "lb3o4r", "sm4a+int8"])
@pytest.mark.parametrize("size", [(1, 16, 64), (2, 13, 70)])
def test_request_nbytes_is_the_sum_of_what_a_session_sends(name: str, size) -> None:
    """request_nbytes / mean_nbytes count every layer's wire exactly (delta: key frame, then residuals)."""
    from edgeprism.compress import mean_nbytes, request_nbytes

    codec, num_layers = get_codec(name), 5
    hidden, valid = _inputs(*size)
    session = codec.session() if hasattr(codec, "session") else None
    sent = 0
    for layer in range(num_layers):
        wire = session.encode(layer, hidden, valid) if session else codec.encode(hidden, valid)
        sent += sum(t.numel() * t.element_size() for t in wire)
        hidden = hidden + 0.3 * torch.randn_like(hidden)
    assert request_nbytes(codec, num_layers, *size) == sent
    assert mean_nbytes(codec, num_layers, *size) == sent / num_layers
    if session is not None:
        assert codec.mean_nbytes(num_layers, *size) == sent / num_layers
        assert sent < num_layers * codec.nbytes(*size)  # nbytes is the key frame alone
    with pytest.raises(ValueError, match="num_layers"):
        request_nbytes(codec, 0, *size)


def test_delta_schedule_names_and_per_layer_formats() -> None:
    codec = get_codec("delta:lb4o4r:lb3o4r*4:lb4o4r")
    assert isinstance(codec, DeltaCodec) and codec.name == "delta:lb4o4r:lb3o4r*4:lb4o4r"
    assert [codec.layer_format(layer).name for layer in range(8)] == ["lb4o4r"] + ["lb3o4r"] * 4 + ["lb4o4r"] * 3
    assert get_codec("delta:lb4o4r:lb3o4r*2:lb3o4r") == get_codec("delta:lb4o4r:lb3o4r")  # trailing = rest
    assert get_codec("delta:lb4o4r:lb3o4r").name == "delta:lb4o4r:lb3o4r"
    # d = 384, one row of 64 tokens over 6 layers: key frame lb4o4r (+ mask), four lb3o4r, one lb4o4r
    lb4, lb3 = 64 * (192 + 2 + 16), 64 * (144 + 2 + 16)
    assert [codec.layer_nbytes(layer, 1, 64, 384) for layer in range(6)] == [lb4 + 2 + 8] + [lb3 + 2] * 4 + [lb4 + 2]
    for bad in ("delta:lb4*2:lb3", "delta:lb4:lb3*2", "delta:lb4:lb3*0:lb4", "delta:lb4::lb3"):
        with pytest.raises(ValueError, match="delta"):
            get_codec(bad)


def test_delta_schedule_session_uses_each_layers_format() -> None:
    """The layer the schedule gives 8 bits is reconstructed far better than its 2-bit neighbours."""
    gen = torch.Generator().manual_seed(4)
    codec = get_codec("delta:lb8o4:lb2r:lb8r:lb2r")
    sender, receiver = codec.session(), codec.session()
    hidden, valid = torch.randn(1, 32, 64, generator=gen), torch.ones(1, 32, dtype=torch.bool)
    errors = []
    for layer in range(4):
        step = hidden + torch.randn(1, 32, 64, generator=gen)  # a residual as large as the state
        wire = sender.encode(layer, step, valid)
        assert [(tuple(t.shape), t.dtype) for t in wire] == sender.wire_spec(layer, 1, 32, 64)
        vectors, _ = receiver.decode(layer, 1, unpack(pack(wire), sender.wire_spec(layer, 1, 32, 64)))
        errors.append(float((vectors - step).pow(2).mean() / step.pow(2).mean()))
        hidden = step
    assert errors[2] < errors[1] / 20 and errors[2] < errors[3] / 20
