"""Building blocks shared by the reference models.

Attention takes its queries and its keys/values from separate inputs. The reference models call it
with the same tokens for both; the position-wise transform (`edgeprism.partition`) calls it with a
rank's own tokens as queries and [own tokens ; received vectors] as keys/values. One math path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeprism.models.config import ModelConfig


def mask_value(dtype: torch.dtype) -> float:
    """Additive bias for a masked key: finite, so a row with every key masked gives no NaN."""
    return torch.finfo(dtype).min


@dataclass(frozen=True)
class CausalSquare:
    """An attention bias that is exactly the square causal mask over positions 0..T-1 with no padding key.
    Passed instead of the explicit (T, T) tensor so that attention takes SDPA's fused causal path
    (`is_causal`), which skips the masked half (1.5x faster attention at 1024 tokens on one core here;
    equal results). Only the single-device reference builds it; every other bias stays a tensor."""


CAUSAL_SQUARE = CausalSquare()
Bias = Tensor | CausalSquare | None
"""What attention adds to its logits: an additive tensor broadcasting to (B, heads, T_q, T_kv), the causal
marker, or nothing."""


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Bias, scale: float) -> Tensor:
    """Softmax attention (B, heads, T_q, head_dim) of q over k, v with `bias` added to the logits."""
    if isinstance(bias, CausalSquare):
        assert q.shape[-2] == k.shape[-2], "the causal marker is for a square mask (queries = keys)"
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def activation(name: str):
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {name!r}; use gelu or gelu_new")


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.output = nn.Linear(d, d)

    def project_kv(self, x_kv: Tensor) -> tuple[Tensor, Tensor]:
        batch, num_kv, _ = x_kv.shape
        k = self.key(x_kv).view(batch, num_kv, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.value(x_kv).view(batch, num_kv, self.num_heads, self.head_dim).transpose(1, 2)
        return k, v  # each (B, heads, T_kv, head_dim)

    @property
    def scale(self) -> float:
        """The logits' scale, 1 / sqrt(head_dim)."""
        return 1.0 / math.sqrt(self.head_dim)

    def project_q(self, x_q: Tensor) -> Tensor:
        batch, num_q, _ = x_q.shape
        return self.query(x_q).view(batch, num_q, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, T_q, hd)

    def project_out(self, heads: Tensor) -> Tensor:
        """Attention output per head (B, heads, T_q, head_dim) -> (B, T_q, d) through the output projection."""
        batch, _, num_q, _ = heads.shape
        return self.output(heads.transpose(1, 2).reshape(batch, num_q, self.num_heads * self.head_dim))

    def attend(self, x_q: Tensor, k: Tensor, v: Tensor, bias: Bias) -> Tensor:
        q = self.project_q(x_q)  # (B, heads, T_q, head_dim); bias broadcasts to (B, heads, T_q, T_kv)
        return self.project_out(attention(q, k, v, bias, self.scale))

    def forward(self, x_q: Tensor, x_kv: Tensor, bias: Bias = None) -> Tensor:
        k, v = self.project_kv(x_kv)
        return self.attend(x_q, k, v, bias)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class LayerScale(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class PreNormBlock(nn.Module):
    """x + attn(LN(x)); x + mlp(LN(x)) — ViT, DINOv2 (with LayerScale), GPT-2."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.scale1: nn.Module = LayerScale(d) if config.layerscale else nn.Identity()
        self.scale2: nn.Module = LayerScale(d) if config.layerscale else nn.Identity()

    def kv_input(self, residual: Tensor) -> Tensor:
        """What K/V projections read for a residual-stream vector (own token or received mean)."""
        return self.norm1(residual)

    def forward(self, x: Tensor, context: Tensor | None = None, bias: Bias = None,
                kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x (B, T_own, d); context (B, S, d) residual-stream vectors appended as keys/values only;
        kv: precomputed (k, v) for the keys/values instead of `context` (decode cache)."""
        h = self.norm1(x)
        if kv is None:
            kv_in = h if context is None else torch.cat([h, self.norm1(context)], dim=1)  # (B, T_own + S, d)
            kv = self.attn.project_kv(kv_in)
        return self.after_attention(x, self.attn.attend(h, kv[0], kv[1], bias))

    def after_attention(self, x: Tensor, attended: Tensor) -> Tensor:
        """The rest of the block given the attention's projected output (B, T, d) for queries `x`."""
        x = x + self.scale1(attended)
        return x + self.scale2(self.mlp(self.norm2(x)))


class PostNormBlock(nn.Module):
    """LN(x + attn(x)); LN(x + mlp(x)) — BERT."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.attn = Attention(config)
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def kv_input(self, residual: Tensor) -> Tensor:
        return residual

    def forward(self, x: Tensor, context: Tensor | None = None, bias: Bias = None,
                kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if kv is None:
            kv_in = x if context is None else torch.cat([x, context], dim=1)  # (B, T_own + S, d)
            kv = self.attn.project_kv(kv_in)
        return self.after_attention(x, self.attn.attend(x, kv[0], kv[1], bias))

    def after_attention(self, x: Tensor, attended: Tensor) -> Tensor:
        """The rest of the block given the attention's projected output (B, T, d) for queries `x`."""
        h = self.norm1(x + attended)
        return self.norm2(h + self.mlp(h))


def key_padding_bias(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """valid (B, T_kv) bool → additive bias (B, 1, 1, T_kv)."""
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    bias = bias.masked_fill(~valid, mask_value(dtype))
    return bias[:, None, None, :]


def causal_bias(query_positions: Tensor, key_positions: Tensor, dtype: torch.dtype) -> Tensor:
    """Absolute positions (T_q,), (T_kv,) → (1, 1, T_q, T_kv): a query sees keys at or before it."""
    allowed = key_positions[None, :] <= query_positions[:, None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=query_positions.device)
    return bias.masked_fill(~allowed, mask_value(dtype))[None, None]


def interpolate_grid(table: Tensor, grid: int, new_h: int, new_w: int) -> Tensor:
    """Bicubic resize of a (grid*grid, d) position table to (new_h*new_w, d), as DINOv2/transformers do."""
    if new_h == grid and new_w == grid:
        return table
    d = table.shape[-1]
    image = table.reshape(1, grid, grid, d).permute(0, 3, 1, 2)  # (1, d, grid, grid)
    image = F.interpolate(image.float(), size=(new_h, new_w), mode="bicubic", align_corners=False).to(table.dtype)
    return image.permute(0, 2, 3, 1).reshape(new_h * new_w, d)
