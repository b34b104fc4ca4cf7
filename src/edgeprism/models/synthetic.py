"""Seeded synthetic requests for tests, demos and benchmarks (no data download).

`synthetic_inputs` asks the config's family for its maker (`FamilyEntry.synthetic_inputs`); the makers
below serve the built-in families and any new one whose requests look like theirs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edgeprism.models.base import Inputs
from edgeprism.models.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from edgeprism.models.registry import get_family


def synthetic_inputs(config: ModelConfig, batch: int, seq_len: int | None = None, image_size: int | None = None,
                     padded: bool = False, seed: int = 0) -> Inputs:
    """A request for `config`: random 8-bit images (normalised), or random token ids (right-padded rows when
    `padded`)."""
    if batch < 1:
        raise ValueError(f"batch {batch} must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    return get_family(config.family).synthetic_inputs(config, batch, generator, seq_len, image_size, padded)


def normalise_images(images: Tensor) -> Tensor:
    """(B, C, H, W) uint8 images -> float32 `pixel_values` as the default preprocessing makes them
    (inputs/image.py `ImagePreprocessor.defaults`, after its resize): x * 1/255 in float64, cast to float32, then
    (x - mean) / std in float32 with ImageNet's statistics (their channel averages for other than 3 channels)."""
    channels = images.shape[1]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    if channels != 3:
        mean, std = (sum(mean) / 3,) * channels, (sum(std) / 3,) * channels
    pixels = (images.to(torch.float64) * (1 / 255)).to(torch.float32)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]  # (C, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (pixels - mean_t) / std_t


def image_inputs(config: ModelConfig, batch: int, generator: torch.Generator, seq_len: int | None,
                 image_size: int | None, padded: bool) -> Inputs:
    """{"pixel_values": (B, C, side, side)}: random 8-bit images, normalised as the default preprocessing does
    (users send images: each channel takes at most 256 values). `padded` has no meaning for images."""
    side = image_size or config.image_size
    images = torch.randint(0, 256, (batch, config.num_channels, side, side), generator=generator, dtype=torch.uint8)
    return {"pixel_values": normalise_images(images)}


def normal_image_inputs(config: ModelConfig, batch: int, generator: torch.Generator, seq_len: int | None,
                        image_size: int | None, padded: bool) -> Inputs:
    """{"pixel_values": (B, C, side, side)} standard-normal pixels: nearly every value distinct, unlike any image
    a user sends (the scatter sends them as they are). Same signature as `image_inputs`."""
    side = image_size or config.image_size
    return {"pixel_values": torch.randn(batch, config.num_channels, side, side, generator=generator)}


def text_inputs(config: ModelConfig, batch: int, generator: torch.Generator, seq_len: int | None,
                image_size: int | None, padded: bool) -> Inputs:
    """{"input_ids": (B, T)} and, when `padded`, right-padded rows with an attention_mask (row 0 full)."""
    seq_len = seq_len or min(64, config.max_positions)
    ids = torch.randint(1, config.vocab_size, (batch, seq_len), generator=generator)
    inputs = {"input_ids": ids}
    if padded:
        lengths = torch.randint(max(1, seq_len // 3), seq_len + 1, (batch,), generator=generator)
        lengths[0] = seq_len
        mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
        inputs["input_ids"] = ids.masked_fill(mask == 0, config.pad_token_id)
        inputs["attention_mask"] = mask
    return inputs


def text_inputs_with_types(config: ModelConfig, batch: int, generator: torch.Generator, seq_len: int | None,
                           image_size: int | None, padded: bool) -> Inputs:
    """`text_inputs` plus token_type_ids: segment A for the first half of each row, B for the second."""
    inputs = text_inputs(config, batch, generator, seq_len, image_size, padded)
    types = torch.zeros_like(inputs["input_ids"])
    if config.type_vocab_size > 1:  # RoBERTa-style encoders have one segment type
        types[:, types.shape[1] // 2:] = 1
    inputs["token_type_ids"] = types
    return inputs


def pads_rows(config: ModelConfig) -> bool:
    """Whether synthetic evaluation requests for `config` are right-padded: text encoders, whose padding
    masks matter to every token, yes; decoders (unpadded prompts) and image models, no."""
    return config.modality == "text" and not config.causal
