"""What every reference model offers the position-wise transform, besides being a plain nn.Module.

A request's input is a dict of tensors (`pixel_values`; or `input_ids`, `attention_mask`,
`token_type_ids`). `split_input` cuts it into the raw slices each token range needs, `embed` turns a
slice into hidden states with absolute positions, and `blocks`/`finish` do the rest. `forward` is the
single-device reference built from exactly those pieces.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgeprism.models.common import causal_bias, key_padding_bias
from edgeprism.models.config import ModelConfig

Inputs = dict[str, Tensor]


class ReferenceModel(nn.Module):
    config: ModelConfig
    blocks: nn.ModuleList
    causal: bool = False

    # --- pieces the position-wise transform uses ---
    def validate_input(self, inputs: Inputs) -> int:
        """Raise ValueError for a malformed request; return its token count per row."""
        raise NotImplementedError

    def split_input(self, inputs: Inputs, token_start: int, token_end: int) -> Inputs:
        """The raw input a rank owning tokens [token_start, token_end) needs (and nothing more)."""
        raise NotImplementedError

    def embed(self, part: Inputs, token_start: int, token_end: int) -> Tensor:
        """(B, token_end - token_start, d) embeddings with absolute positions added."""
        raise NotImplementedError

    def valid_mask(self, part: Inputs, batch: int, num_tokens: int) -> Tensor:
        """(B, n) bool: False for padding."""
        if "attention_mask" in part:
            return part["attention_mask"].bool()
        return torch.ones(batch, num_tokens, dtype=torch.bool)

    def anchor_mask(self, part: Inputs, token_start: int, token_end: int) -> Tensor:
        """(B, n) bool: attention-sink tokens that anchor codecs keep exact (token 0 by default)."""
        batch = next(v for k, v in part.items() if k not in ("grid_hw", "lengths")).shape[0]
        valid = self.valid_mask(part, batch, token_end - token_start)
        anchor = torch.zeros_like(valid)
        if token_start == 0:
            anchor[:, 0] = True
        return anchor & valid

    def finish(self, hidden: Tensor) -> Tensor:
        """Final normalisation of the residual stream (identity where the model has none)."""
        return hidden

    def head(self, hidden_rows: Tensor) -> dict[str, Tensor]:
        """Outputs computed from special rows ([CLS] or the last position): {name: (B, ...)}."""
        return {}

    # --- the single-device reference ---
    def forward(self, inputs: Inputs) -> dict[str, Tensor]:
        num_tokens = self.validate_input(inputs)
        hidden = self.embed(inputs, 0, num_tokens)  # (B, T, d)
        valid = self.valid_mask(inputs, hidden.shape[0], num_tokens).to(hidden.device)
        bias = key_padding_bias(valid, hidden.dtype)  # (B, 1, 1, T)
        if self.causal:
            positions = torch.arange(num_tokens, device=hidden.device)
            bias = bias + causal_bias(positions, positions, hidden.dtype)  # (B, 1, T, T)
        for block in self.blocks:
            hidden = block(hidden, bias=bias)
        hidden = self.finish(hidden)
        outputs = {"hidden": hidden}
        row = hidden[:, -1] if self.causal else hidden[:, 0]
        outputs.update(self.head(row))
        if not self.causal:
            weights = valid.to(hidden.dtype)[..., None]
            outputs["mean"] = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return outputs
