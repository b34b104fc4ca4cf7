"""Exchange overlapped with compute: one block's attention in two parts, merged exactly.

While a layer's exchange is in flight, a rank already has everything its own tokens need: their queries,
their keys/values and the attention over them. Only the received vectors are missing. So the block's
attention is computed in two parts over disjoint key sets — own keys first, received keys when they
arrive — and the parts are merged by their log-sum-exp (the softmax over a union of key sets is the
lse-weighted mix of the softmaxes over each set; the flash-attention identity). The merge is exact up to
float rounding, so CR = 1 still matches the single-device model (tests/test_overlap.py).

A block opts in by fitting `models.base.SplitBlock`; others run unsplit (`PositionWise` checks once).
"""

from __future__ import annotations

import torch
from torch import Tensor

from edgeprism.models.base import SplitBlock
from edgeprism.models.common import causal_bias

_FUSED_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attention_part(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
                   causal: bool = False) -> tuple[Tensor, Tensor]:
    """Softmax attention of q (B, h, T_q, hd) over one key set k, v (B, h, T_k, hd) with additive `bias`
    (broadcasting to (B, h, T_q, T_k)) -> (out (B, h, T_q, hd), lse (B, h, T_q, 1)), where lse is the
    log-sum-exp of the part's logits. `causal` (no `bias`, T_q = T_k): query i sees keys 0..i, the fused
    kernel skipping the rest. On CPU torch's fused kernel returns both; elsewhere the plain math."""
    if k.shape[-2] == 0:  # nothing to attend to: a part that adds nothing to the merge
        return q.new_zeros(q.shape[:-1] + v.shape[-1:]), q.new_full(q.shape[:-1] + (1,), float("-inf"))
    assert not causal or (bias is None and q.shape[-2] == k.shape[-2]), "causal: a square part with no bias"
    if _FUSED_CPU is not None and q.device.type == "cpu" and q.dtype == torch.float32:
        mask = None if bias is None else bias.expand(q.shape[0], -1, q.shape[2], k.shape[2])
        out, lse = _FUSED_CPU(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        return out, lse.unsqueeze(-1)
    logits = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, h, T_q, T_k)
    if causal:
        positions = torch.arange(q.shape[-2], device=q.device)
        bias = causal_bias(positions, positions, q.dtype)  # (1, 1, T_q, T_k)
    if bias is not None:
        logits = logits + bias
    top = logits.amax(dim=-1, keepdim=True)
    weights = torch.exp(logits - top)
    total = weights.sum(dim=-1, keepdim=True)
    return torch.matmul(weights, v) / total, top + torch.log(total)


def merge_parts(first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor]) -> Tensor:
    """Two `attention_part` results over disjoint key sets -> the attention over their union (B, h, T_q, hd)."""
    (out_a, lse_a), (out_b, lse_b) = first, second
    lse = torch.logaddexp(lse_a, lse_b)  # (B, h, T_q, 1)
    return out_a * torch.exp(lse_a - lse) + out_b * torch.exp(lse_b - lse)


class OwnPart:
    """A block's attention over a rank's own tokens, computed before the received vectors arrive.

    `kv_in` (B, n_own, d) is `block.kv_input(hidden)` (also the queries' input); `own_bias` (B, 1, n_own, n_own);
    `kv`: the own keys and values if already projected (each (B, heads, n_own, head_dim); compress/kvshare.py
    sends some of them)."""

    def __init__(self, block: SplitBlock, kv_in: Tensor, own_bias: Tensor,
                 kv: tuple[Tensor, Tensor] | None = None) -> None:
        attn = block.attn
        self.block = block
        self.q = attn.project_q(kv_in)  # (B, heads, n_own, head_dim)
        self.kv = kv if kv is not None else attn.project_kv(kv_in)  # each (B, heads, n_own, head_dim)
        self.part = attention_part(self.q, self.kv[0], self.kv[1], own_bias, attn.scale)

    def finish(self, hidden: Tensor, remote_kv_in: Tensor, remote_bias: Tensor, keep_kv: bool = False,
               remote_kv: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Fold in the received vectors' K/V inputs (B, S_in, d) and the keys and values that arrived as such
        (`remote_kv`, each (B, heads, S_kv, head_dim); None: none), with their bias (B, 1, 1, S_in + S_kv) in
        that order -> (the block's output for `hidden` (B, n_own, d), (k, v) over [own ; remote] if `keep_kv`,
        else None)."""
        attended, kv = self.attend(remote_kv_in, remote_bias, keep_kv, remote_kv)
        return self.block.after_attention(hidden, attended), kv

    def attend(self, remote_kv_in: Tensor, remote_bias: Tensor, keep_kv: bool = False,
               remote_kv: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """`finish` up to the attention's output projection -> (attended (B, n_own, d), kv as `finish`): the rest
        of the block (`block.after_attention`) is per token, so a caller may run it on slices of the own tokens."""
        attn = self.block.attn
        k_remote, v_remote = attn.project_kv(remote_kv_in)  # each (B, heads, S_in, head_dim)
        if remote_kv is not None:
            k_remote, v_remote = torch.cat([k_remote, remote_kv[0]], dim=2), torch.cat([v_remote, remote_kv[1]], dim=2)
        remote = attention_part(self.q, k_remote, v_remote, remote_bias, attn.scale)
        heads = merge_parts(self.part, remote)  # (B, heads, n_own, head_dim)
        kv = (torch.cat([self.kv[0], k_remote], dim=2), torch.cat([self.kv[1], v_remote], dim=2)) if keep_kv else None
        return attn.project_out(heads), kv


__all__ = ["OwnPart", "attention_part", "merge_parts"]
