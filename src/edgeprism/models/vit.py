"""Reference ViT (and DINOv2 with LayerScale): [CLS] + patches, pre-LN blocks, final LayerNorm."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgeprism.models.base import Inputs, ReferenceModel
from edgeprism.models.common import PreNormBlock, interpolate_grid
from edgeprism.models.config import ModelConfig


class ViT(ReferenceModel):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.patch_embed = nn.Conv2d(config.num_channels, d, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.grid * config.grid + 1, d))
        self.blocks = nn.ModuleList(PreNormBlock(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.pooler = nn.Linear(d, d) if config.pooler == "dense_tanh" else None

    def validate_input(self, inputs: Inputs) -> int:
        c = self.config
        if set(inputs) != {"pixel_values"}:
            raise ValueError(f"{c.name} takes {{'pixel_values'}}, got keys {sorted(inputs)}")
        pixels = inputs["pixel_values"]
        if pixels.dim() != 4:
            raise ValueError(f"pixel_values has shape {tuple(pixels.shape)}; {c.name} takes (batch, "
                             f"{c.num_channels}, H, W)")
        batch, channels, height, width = pixels.shape
        if channels != c.num_channels:
            raise ValueError(f"batch has {batch} images with {channels} channels; {c.name} takes {c.num_channels}")
        if height != width or height % c.patch_size or height < c.patch_size:
            raise ValueError(f"batch has {batch} images of {height}x{width}; {c.name} takes square images whose "
                             f"side is a multiple of {c.patch_size} (native {c.image_size}x{c.image_size})")
        if not pixels.is_floating_point():
            raise ValueError(f"pixel_values has dtype {pixels.dtype}; give a floating-point tensor")
        return (height // c.patch_size) * (width // c.patch_size) + 1

    def split_input(self, inputs: Inputs, token_start: int, token_end: int) -> Inputs:
        pixels = inputs["pixel_values"]
        batch, channels, height, width = pixels.shape
        p = self.config.patch_size
        grid_h, grid_w = height // p, width // p
        patches = pixels.reshape(batch, channels, grid_h, p, grid_w, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, grid_h * grid_w, channels * p * p)  # (B, num_patches, C*P*P)
        # token 0 is [CLS]; token t >= 1 is patch t - 1
        first_patch, end_patch = max(token_start, 1) - 1, token_end - 1
        return {"patches": patches[:, first_patch:end_patch].contiguous(),
                "grid_hw": torch.tensor([grid_h, grid_w])}

    def pixel_channels(self) -> dict[str, int]:
        return {"patches": self.config.num_channels}  # (B, n_patches, C*P*P): each patch (C, P, P) flattened

    def embed(self, part: Inputs, token_start: int, token_end: int) -> Tensor:
        if "pixel_values" in part:  # the whole request (reference path)
            part = self.split_input(part, token_start, token_end)
        patches = part["patches"]
        weight = self.patch_embed.weight.reshape(self.config.hidden_size, -1)  # (d, C*P*P)
        bias = self.patch_embed.bias
        assert bias is not None, "the patch embedding has a bias (as in ViTModel)"
        hidden = patches @ weight.T + bias  # (B, n_patches_own, d)
        if token_start == 0:
            cls = self.cls_token.expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([cls, hidden], dim=1)  # (B, n_own, d)
        grid_h, grid_w = (int(v) for v in part["grid_hw"])
        table = self.position_embeddings[0]
        patch_table = interpolate_grid(table[1:], self.config.grid, grid_h, grid_w)
        positions = torch.cat([table[:1], patch_table], dim=0)[token_start:token_end]  # (n_own, d)
        return hidden + positions

    def finish(self, hidden: Tensor) -> Tensor:
        return self.norm(hidden)

    def head(self, cls_row: Tensor) -> dict[str, Tensor]:
        pooled = cls_row if self.pooler is None else torch.tanh(self.pooler(cls_row))
        return {"cls": cls_row, "pooled": pooled}
