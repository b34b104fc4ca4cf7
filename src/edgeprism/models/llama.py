"""Reference Llama-family decoder (transformers' `LlamaForCausalLM`): token embeddings, pre-RMSNorm blocks
with rotary positions and grouped-query attention, SwiGLU MLP, final RMSNorm, tied or untied LM head.

Positions enter only through the rotary rotation of queries and keys, so a block takes the absolute
positions of its tokens. Its ranks exchange keys and values (`models.base.KVExchangeBlock`): a sender
rotates its keys at its tokens' global positions, and the receiver uses them as they arrive.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeprism.models.base import Inputs, ReferenceModel
from edgeprism.models.bert import validate_text
from edgeprism.models.common import Bias, attention
from edgeprism.models.config import ModelConfig

LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def inverse_frequencies(config: ModelConfig) -> Tensor:
    """(head_dim // 2,) rotary inverse frequencies from the config's base and scaling, as transformers'
    `modeling_rope_utils` computes them ("default", "linear", "llama3")."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    params = dict(config.rope_scaling)
    if config.rope_type == "default":
        return inv_freq
    if config.rope_type == "linear":
        return inv_freq / params["factor"]
    missing = [k for k in LLAMA3_KEYS if k not in params]
    if missing:
        raise ValueError(f"{config.name}: llama3 rope scaling needs {', '.join(missing)}; got {sorted(params)}")
    factor, low, high, context = (params[k] for k in LLAMA3_KEYS)
    low_wavelen, high_wavelen = context / low, context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate(x: Tensor, inv_freq: Tensor, positions: Tensor) -> Tensor:
    """x (B, heads, T, head_dim) rotated at absolute `positions` (T,) (rotate-half convention)."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]  # (T, head_dim // 2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class GroupedQueryAttention(nn.Module):
    """num_heads query heads sharing kv_heads key/value heads; no biases (Llama)."""

    inv_freq: Tensor  # (head_dim // 2,) rotary inverse frequencies, a buffer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.kv_heads, self.head_dim = config.num_heads, config.kv_heads, hd
        self.query = nn.Linear(d, config.num_heads * hd, bias=False)
        self.key = nn.Linear(d, config.kv_heads * hd, bias=False)
        self.value = nn.Linear(d, config.kv_heads * hd, bias=False)
        self.output = nn.Linear(config.num_heads * hd, d, bias=False)
        self.register_buffer("inv_freq", inverse_frequencies(config), persistent=False)

    def project_kv(self, x_kv: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x_kv (B, T, d) normed inputs at absolute `positions` (default 0..T-1) -> rotated k, v,
        each (B, kv_heads, T, head_dim)."""
        batch, num_kv, _ = x_kv.shape
        if positions is None:
            positions = torch.arange(num_kv, device=x_kv.device)
        k = self.key(x_kv).view(batch, num_kv, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.value(x_kv).view(batch, num_kv, self.kv_heads, self.head_dim).transpose(1, 2)
        return rotate(k, self.inv_freq, positions), v

    @property
    def scale(self) -> float:
        """The logits' scale, 1 / sqrt(head_dim)."""
        return 1.0 / math.sqrt(self.head_dim)

    def project_q(self, x_q: Tensor, positions: Tensor) -> Tensor:
        batch, num_q, _ = x_q.shape
        q = self.query(x_q).view(batch, num_q, self.num_heads, self.head_dim).transpose(1, 2)
        return rotate(q, self.inv_freq, positions)  # (B, heads, T_q, head_dim)

    def expand_kv(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        group = self.num_heads // self.kv_heads
        return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, heads, T_kv, head_dim)

    def project_out(self, heads: Tensor) -> Tensor:
        batch, _, num_q, _ = heads.shape
        return self.output(heads.transpose(1, 2).reshape(batch, num_q, self.num_heads * self.head_dim))  # (B, T_q, d)

    def attend(self, x_q: Tensor, positions: Tensor, k: Tensor, v: Tensor, bias: Bias) -> Tensor:
        q = self.project_q(x_q, positions)
        return self.project_out(attention(q, *self.expand_kv(k, v), bias, self.scale))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, inner = config.hidden_size, config.intermediate_size
        self.gate = nn.Linear(d, inner, bias=False)
        self.up = nn.Linear(d, inner, bias=False)
        self.down = nn.Linear(inner, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    """x + attn(RMSNorm(x)); x + mlp(RMSNorm(x)). Fits `Block`, `KVExchangeBlock` and `SplitKVBlock`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, config.layer_norm_eps)
        self.attn = GroupedQueryAttention(config)
        self.norm2 = RMSNorm(config.hidden_size, config.layer_norm_eps)
        self.mlp = SwiGLU(config)
        self.kv_width = 2 * config.kv_heads * config.head_dim

    def kv_input(self, residual: Tensor) -> Tensor:
        return self.norm1(residual)

    def wire_kv(self, residual: Tensor, positions: Tensor) -> Tensor:
        k, v = self.attn.project_kv(self.norm1(residual), positions)  # each (B, kv_heads, n, head_dim)
        batch, _, num, _ = k.shape
        return torch.cat([k, v], dim=1).transpose(1, 2).reshape(batch, num, self.kv_width)  # (B, n, kv_width)

    def kv_from_wire(self, wire: Tensor) -> tuple[Tensor, Tensor]:
        batch, num, _ = wire.shape
        heads = self.attn.kv_heads
        kv = wire.view(batch, num, 2 * heads, self.attn.head_dim).transpose(1, 2)  # (B, 2 * kv_heads, n, head_dim)
        return kv[:, :heads], kv[:, heads:]

    def forward(self, x: Tensor, bias: Bias = None, kv: tuple[Tensor, Tensor] | None = None,
                positions: Tensor | None = None) -> Tensor:
        """x (B, T_own, d) at absolute `positions` (default 0..T_own-1); kv: (k, v) to attend to instead of
        x's own (received and cached keys/values included)."""
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        h = self.norm1(x)
        if kv is None:
            kv = self.attn.project_kv(h, positions)
        return self.after_attention(x, self.attn.attend(h, positions, kv[0], kv[1], bias))

    def after_attention(self, x: Tensor, attended: Tensor) -> Tensor:
        """The rest of the block given the attention's projected output (B, T, d) for queries `x`."""
        x = x + attended
        return x + self.mlp(self.norm2(x))


class Llama(ReferenceModel):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.blocks = nn.ModuleList(LlamaBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(d, config.layer_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(d, config.vocab_size, bias=False)

    def validate_input(self, inputs: Inputs) -> int:
        return validate_text(self.config, inputs, {"input_ids", "attention_mask"})

    def split_input(self, inputs: Inputs, token_start: int, token_end: int) -> Inputs:
        return {k: inputs[k][:, token_start:token_end].contiguous() for k in ("input_ids", "attention_mask")
                if k in inputs}

    def embed(self, part: Inputs, token_start: int, token_end: int) -> Tensor:
        return self.embed_tokens(part["input_ids"])  # (B, n_own, d); positions are rotary, in the blocks

    def finish(self, hidden: Tensor) -> Tensor:
        return self.norm(hidden)

    def logits(self, hidden: Tensor) -> Tensor:
        if self.lm_head is None:
            return hidden @ self.embed_tokens.weight.T  # tied head: (..., vocab)
        return self.lm_head(hidden)

    def head(self, last_row: Tensor) -> dict[str, Tensor]:
        return {"last": last_row, "logits_last": self.logits(last_row)}
