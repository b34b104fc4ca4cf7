"""Seeded synthetic requests for tests, demos and benchmarks (no data download)."""

from __future__ import annotations

import torch

from edgeprism.models.base import Inputs
from edgeprism.models.config import ModelConfig


def synthetic_inputs(config: ModelConfig, batch: int, seq_len: int | None = None, image_size: int | None = None,
                     padded: bool = False, seed: int = 0) -> Inputs:
    """A request for `config`: random pixels, or random token ids (right-padded rows when `padded`)."""
    if batch < 1:
        raise ValueError(f"batch {batch} must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    if config.family == "vit":
        side = image_size or config.image_size
        return {"pixel_values": torch.randn(batch, config.num_channels, side, side, generator=generator)}
    seq_len = seq_len or min(64, config.max_positions)
    ids = torch.randint(1, config.vocab_size, (batch, seq_len), generator=generator)
    inputs = {"input_ids": ids}
    if padded:
        lengths = torch.randint(max(1, seq_len // 3), seq_len + 1, (batch,), generator=generator)
        lengths[0] = seq_len
        mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
        inputs["input_ids"] = ids.masked_fill(mask == 0, config.pad_token_id)
        inputs["attention_mask"] = mask
    if config.family == "bert":
        types = torch.zeros_like(ids)
        types[:, seq_len // 2:] = 1
        inputs["token_type_ids"] = types
    return inputs
