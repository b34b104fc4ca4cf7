"""The scatter's levels wire form (compress/pixels.py, partition/scatter.py): 8-bit pixels travel as uint8 codes
plus each channel's levels and come back bit for bit; anything else travels as it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprism.assets.datasets import to_dinov2_input
from edgeprism.comm.loopback import LoopbackGroup
from edgeprism.compress.base import pack, spec_nbytes, unpack
from edgeprism.compress.pixels import MAX_LEVELS, decode_levels, encode_levels
from edgeprism.models.config import get_config
from edgeprism.models.loading import build_model
from edgeprism.models.synthetic import normal_image_inputs, normalise_images, synthetic_inputs
from edgeprism.partition.ranges import equal_shares, split_tokens
from edgeprism.partition.scatter import part_wire_spec, read_part, scatter_ratio, wire_part, wire_tensors
from edgeprism.partition.transform import PositionWise
from edgeprism.plan import LinkEstimate, Plan, Request, predict
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.runtime.control import ControlError, validate_split

TOLERANCE = 1e-5


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def _images(batch: int, channels: int, side: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, channels, side, side), generator=generator, dtype=torch.uint8)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 121), (5, 169), (1001,)])
def test_levels_round_trip_bitwise(channels, dtype, shape):
    """Odd sizes, both layouts' channel counts, every float dtype a request may come in; -0.0 and 0.0 and a
    NaN are levels of their own and come back as the same bits."""
    shape = (*shape[:-1], channels * shape[-1])
    rows, block = torch.Size(shape[:-1]).numel(), shape[-1] // channels
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 253, (rows, channels, block, 1), generator=generator, dtype=torch.uint8)  # 3 spare
    part = normalise_images(images).reshape(shape).to(dtype)  # each row: channel 0's block, channel 1's, ...
    flat = part.view(-1)
    flat[0], flat[1], flat[2] = -0.0, 0.0, float("nan")
    encoded = encode_levels(part, channels)
    assert encoded is not None
    codes, table = encoded
    assert codes.dtype == torch.uint8 and codes.shape == part.shape
    assert table.dtype == dtype and table.shape[0] == channels and table.shape[1] <= MAX_LEVELS
    assert torch.equal(_bits(decode_levels(codes, table)), _bits(part))


def test_more_than_256_levels_fall_back():
    assert encode_levels(torch.randn(4, 9, 3 * 16), 3) is None  # standard-normal pixels: sent as they are
    part = normalise_images(_images(4, 3, 32)).reshape(4, -1)  # (4, 3 * 1024), channel-major
    assert encode_levels(part, 3) is not None
    odd = part.clone()
    odd[:, 2048:2048 + 300] = torch.linspace(10.0, 11.0, 300)  # channel 2 now takes > 256 values
    assert encode_levels(odd, 3) is None
    exactly = torch.arange(256, dtype=torch.float32).repeat(4)[None]  # 256 levels: still codes
    assert encode_levels(exactly, 1) is not None
    assert encode_levels(torch.cat([exactly, torch.tensor([[0.5]])], dim=1), 1) is None  # 257
    assert encode_levels(torch.arange(12).reshape(2, 6), 3) is None  # token ids are not pixels
    assert encode_levels(torch.zeros(2, 7), 3) is None  # 7 values do not split into 3 channels
    assert encode_levels(torch.zeros(1, 3), 3) is None  # 3 bytes of codes + 12 of table: not smaller


@pytest.mark.parametrize("channels", [3, 1])
def test_synthetic_images_are_the_default_preprocessing(channels):
    """`normalise_images` (models/ may not import inputs/) equals inputs/image.py's default preprocessing."""
    pil = pytest.importorskip("PIL.Image")
    from edgeprism.inputs.image import ImagePreprocessor

    images = _images(2, channels, 16, seed=3)
    preprocess = ImagePreprocessor.defaults(16, channels)
    arrays = images.permute(0, 2, 3, 1).numpy()
    want = torch.stack([torch.from_numpy(preprocess(pil.fromarray(a[..., 0] if channels == 1 else a)))
                        for a in arrays])
    assert torch.equal(_bits(normalise_images(images)), _bits(want))
    pixels = synthetic_inputs(get_config("vit-tiny-test"), 2, seed=1)["pixel_values"]
    assert all(pixels[:, c].unique().numel() <= MAX_LEVELS for c in range(pixels.shape[1]))


@pytest.mark.parametrize("name", ["vit-tiny-test", "dinov2-tiny-test", "bert-tiny-test"])
def test_wire_part_reads_back_bit_for_bit(name):
    model = build_model(name)
    inputs = synthetic_inputs(model.config, 3, seed=2)
    num_tokens = model.validate_input(inputs)
    for r in split_tokens(num_tokens, (0.5, 0.3, 0.2)):
        part = model.split_input(inputs, r.start, r.end)
        spec, wire = wire_part(model, part)
        assert any(len(s) == 3 for s in spec.values()) == bool(model.pixel_channels())  # text: token ids as they are
        wire_spec = part_wire_spec(spec)
        payload = pack(wire_tensors(spec, wire))
        assert payload.numel() == spec_nbytes(wire_spec)
        back = read_part(spec, unpack(payload, wire_spec))
        assert back.keys() == part.keys()
        assert all(back[k].dtype == part[k].dtype and torch.equal(back[k].view(-1).view(torch.uint8),
                                                                  part[k].contiguous().view(-1).view(torch.uint8))
                   for k in part)


def test_dinov2_demo_images_travel_as_levels_bit_for_bit():
    """Grey 28 x 28 images as the DINOv2 demo and eval prepare them (`to_dinov2_input`: an 8-bit resize, then the
    normalisation) travel in the levels form, under a third of float32, and come back bit for bit."""
    model = build_model("dinov2-tiny-test")  # patch 7: 56 px = 8 x 8 patches
    images = np.random.default_rng(4).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    inputs = {"pixel_values": to_dinov2_input(images, 56)}
    second = split_tokens(model.validate_input(inputs), equal_shares(2))[1]
    part = model.split_input(inputs, second.start, second.end)  # what rank 0 scatters to rank 1
    spec, wire = wire_part(model, part)
    assert len(spec["patches"]) == 3  # codes + levels (`grid_hw`, two ints, goes as it is)
    raw_bytes = sum(v.numel() * v.element_size() for v in part.values())
    assert spec_nbytes(part_wire_spec(spec)) < raw_bytes / 3
    back = read_part(spec, unpack(pack(wire_tensors(spec, wire)), part_wire_spec(spec)))
    assert all(back[k].dtype == part[k].dtype and torch.equal(back[k].view(-1).view(torch.uint8),
                                                              part[k].contiguous().view(-1).view(torch.uint8))
               for k in part)


@pytest.mark.parametrize(("name", "world", "shares"), [
    ("vit-tiny-test", 2, None), ("vit-tiny-test", 3, (0.5, 0.3, 0.2)), ("dinov2-tiny-test", 3, None)])
@pytest.mark.parametrize("pixels", ["8-bit", "normal"])
def test_the_split_gives_the_reference_and_scatters_a_quarter(name, world, shares, pixels):
    model = build_model(name)
    side = 12 * model.config.patch_size  # 144 patches: a part's 3 x 256 levels weigh little against its codes
    inputs = (synthetic_inputs(model.config, 4, image_size=side, seed=5) if pixels == "8-bit" else
              normal_image_inputs(model.config, 4, torch.Generator().manual_seed(5), None, side, False))

    def rank_fn(ctx, exchanger):
        transform = PositionWise(model, ctx, exchanger=exchanger)
        outputs = transform.forward(inputs if ctx.is_root else None, shares=shares)
        return outputs, exchanger.stats.per_kind_nbytes.get("scatter", 0)

    results = LoopbackGroup(world).run(rank_fn)
    outputs, scatter_bytes = results[0]
    reference = model(inputs)
    for key in ("mean", "cls"):
        assert (outputs[key] - reference[key]).abs().max() <= TOLERANCE, key
    ranges = split_tokens(model.validate_input(inputs), shares or equal_shares(world))
    float_bytes = sum(4 * model.split_input(inputs, r.start, r.end)["patches"].numel() for r in ranges[1:])
    if pixels == "8-bit":
        assert scatter_bytes <= float_bytes / 3.5
    else:
        assert scatter_bytes >= float_bytes  # standard-normal pixels: sent as float32


def test_the_header_carries_levels_specs_the_control_check_accepts():
    model = build_model("vit-tiny-test")
    inputs = synthetic_inputs(model.config, 2, seed=7)

    def rank_fn(ctx, exchanger):  # the split is rank 0's alone: nothing is sent
        transform = PositionWise(model, ctx, exchanger=exchanger)
        return transform.split(inputs, split_tokens(17, (0.5, 0.5)))[0] if ctx.is_root else None

    header = LoopbackGroup(2).run(rank_fn)[0]
    assert len(header["parts"][1]["patches"]) == 3 and len(header["parts"][0]["patches"]) == 2  # rank 0's: raw
    plan = Plan(mode="distributed", ranks=(0, 1), token_shares=(0.5, 0.5), token_counts=(9, 8), codec="fp32", cr=1,
                wire_dtype="fp32", predicted_latency_s=0.1, predicted_energy_j=1.0, energy_source="modelled",
                objective="latency", reason="test")
    validate_split(header, plan)
    header["parts"][1]["patches"][2] = [3, 300]
    with pytest.raises(ControlError, match="named tensor shapes"):
        validate_split(header, plan)


def test_the_cost_model_charges_the_scatter_at_the_request_s_size():
    """The engine's `request_of` gives the planner the levels' bytes per token (`scatter_ratio` of the profile's);
    the prediction's network term falls by exactly the scatter bytes saved."""
    model = build_model("vit-tiny-test")
    eight_bit = synthetic_inputs(model.config, 2, image_size=96, seed=1)
    ratio = scatter_ratio(model, eight_bit, model.validate_input(eight_bit))
    assert ratio is not None and 1 / 4 < ratio < 1 / 3  # 72 patches of 192 codes + 3 x 256 levels, batch 1
    second = split_tokens(model.validate_input(eight_bit), equal_shares(2))[1]
    part = model.split_input(eight_bit, second.start, second.end)  # what a 2-rank split scatters (2 rows)
    spec, _ = wire_part(model, part)
    actual = spec_nbytes(part_wire_spec(spec)) / sum(v.numel() * v.element_size() for v in part.values())
    assert ratio == pytest.approx(actual, rel=0.03)  # the prediction, from 16 tokens of row 0
    normal = normal_image_inputs(model.config, 2, torch.Generator().manual_seed(1), None, None, False)
    assert scatter_ratio(model, normal, 17) is None
    bert = build_model("bert-tiny-test")
    assert scatter_ratio(bert, synthetic_inputs(bert.config, 2, seq_len=16), 16) is None

    profile = synthetic_profile()
    link = LinkEstimate(bandwidth_bps=8e6, latency_s=0.002)
    plan = Plan(mode="distributed", ranks=(0, 1), token_shares=(0.5, 0.5), token_counts=(99, 98), codec="fp32", cr=1,
                wire_dtype="fp32", predicted_latency_s=0.1, predicted_energy_j=1.0, energy_source="modelled",
                objective="latency", reason="test")
    raw = predict(profile, Request(profile.model.name, 8, 197), plan, link)
    compact_bytes = profile.input_bytes_per_token / 4
    compact = predict(profile, Request(profile.model.name, 8, 197, compact_bytes), plan, link)
    saved = 8 * 98 * (profile.input_bytes_per_token - compact_bytes)
    assert raw.network_s - compact.network_s == pytest.approx(8 * saved / link.bandwidth_bps)
    with pytest.raises(ValueError, match="input_bytes_per_token"):
        Request(profile.model.name, 8, 197, -1.0)
