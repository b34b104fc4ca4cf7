"""One rank's step through one block of the position-wise split: the biases over its own keys and the received
vectors, what it sends, and the block over [own tokens ; received vectors] (docs/ARCHITECTURE.md rules 2-5).

Plain functions of tensors: the distributed transform (`partition/transform.py`), its overlapped twin
(`partition/overlap.py`) and the single-process emulation (`edgeprism.calibrate`) all call them.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
from torch import Tensor

from edgeprism.models.base import Block, KVExchangeBlock, SplitKVBlock, call_block
from edgeprism.models.common import causal_bias, key_padding_bias, mask_value
from edgeprism.partition.overlap import attention_part, merge_parts


def remote_key_bias(counts: Tensor, size_aware: bool, dtype: torch.dtype) -> Tensor:
    """counts (B, S) of real tokens per received vector → additive bias (B, 1, 1, S).

    A vector standing for 0 tokens is masked; with size-aware weighting a vector standing for k
    tokens adds log k to its logit (as if its key were repeated k times; rule 4 of docs/ARCHITECTURE.md).
    """
    bias = torch.zeros(counts.shape, dtype=dtype, device=counts.device)
    if size_aware:
        bias = bias + torch.log(counts.clamp_min(1.0)).to(dtype)
    return bias.masked_fill(counts <= 0, mask_value(dtype))[:, None, None, :]


def own_key_bias(valid: Tensor, token_start: int, token_end: int, causal: bool, dtype: torch.dtype) -> Tensor:
    """A rank's bias over its own keys: padding masked, and (decoders) the causal mask over absolute
    positions [token_start, token_end) → (B, 1, n_own, n_own)."""
    batch, num_own = valid.shape
    bias = key_padding_bias(valid, dtype)  # (B, 1, 1, n_own)
    if causal:
        positions = torch.arange(token_start, token_end, device=valid.device)
        bias = bias + causal_bias(positions, positions, dtype)  # (B, 1, n_own, n_own)
    return bias.expand(batch, 1, num_own, num_own)


def exchanged_states(block: Block, hidden: Tensor, average: Literal["residual", "normed"],
                     positions: Tensor | None = None) -> Tensor:
    """What a rank encodes and sends of its own tokens at `block` (docs/ARCHITECTURE.md rule 2 and its
    departures): the residual stream, the block's normalised K/V input ("normed"), or, for a `KVExchangeBlock`
    (rotary), its keys and values rotated at the tokens' absolute `positions` (n,): (B, n, exchange_width)."""
    if isinstance(block, KVExchangeBlock):
        assert positions is not None, "a rotary block's keys need their absolute positions"
        return block.wire_kv(hidden, positions)
    return hidden if average == "residual" else block.kv_input(hidden)


def block_with_remote(block: Block, hidden: Tensor, own_bias: Tensor, remote: Tensor, counts: Tensor,
                      size_aware: bool, average: Literal["residual", "normed"],
                      sent: Tensor | None = None, positions: Tensor | None = None,
                      own_causal_square: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
    """One block of the restructured attention (docs/ARCHITECTURE.md rules 3-5) for one rank.

    hidden (B, n_own, d) own residual stream at absolute `positions` (n_own,); own_bias (B, 1, n_own, n_own)
    from `own_key_bias`; remote (B, S_remote, exchange_width) the decoded vectors this rank may read and counts
    (B, S_remote) the tokens each stands for; `sent`: this rank's own `exchanged_states` if already computed.
    `own_causal_square`: own_bias is exactly the causal mask (a decoder rank with no padding), so a `SplitKVBlock`
    attends in two fused parts (`causal_block_in_parts`) instead of through the explicit bias.
    Returns (new hidden (B, n_own, d), (k, v) over [own ; remote], remote bias (B, 1, 1, S_remote)).
    The distributed transform and the single-process emulation (`edgeprism.calibrate`) both call it.
    """
    batch, num_own, _ = hidden.shape
    if positions is None:
        positions = torch.arange(num_own, device=hidden.device)
    remote_bias = remote_key_bias(counts, size_aware, hidden.dtype)  # (B, 1, 1, S_remote)
    own = sent if sent is not None else exchanged_states(block, hidden, average, positions)  # (B, n_own, width)
    if own_causal_square and isinstance(block, KVExchangeBlock) and isinstance(block, SplitKVBlock):
        return causal_block_in_parts(block, hidden, positions, own, remote, remote_bias)
    wire = torch.cat([own, remote], dim=1)  # (B, n_own + S_remote, width): own and received rows alike
    if isinstance(block, KVExchangeBlock):  # received keys/values are used as they arrive
        kv = block.kv_from_wire(wire)  # each (B, kv_heads, n_own + S_remote, hd)
    else:  # the K/V input per token: the rows themselves ("normed"), or normalised here ("residual")
        kv_in = block.kv_input(wire) if average == "residual" else wire  # (B, n_own + S_remote, d)
        kv = block.attn.project_kv(kv_in)  # each (B, heads, n_own + S_remote, head_dim)
    bias = torch.cat([own_bias, remote_bias.expand(batch, 1, num_own, -1)], dim=-1)  # (B, 1, n_own, n_own + S)
    return call_block(block, hidden, bias, kv, positions), kv, remote_bias  # hidden: (B, n_own, d)


def causal_block_in_parts(block: SplitKVBlock, hidden: Tensor, positions: Tensor, own: Tensor, remote: Tensor,
                          remote_bias: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
    """A decoder rank's rotary block with no padding: attention over its own keys under the square causal mask
    (the fused causal kernel skips the masked half) and over the earlier ranks' received keys, which every own
    query sees, merged by their log-sum-exp (exact up to rounding). own (B, n_own, kv_width) and remote
    (B, S_remote, kv_width) are wire K/V; returns what `block_with_remote` returns."""
    attn = block.attn
    q = attn.project_q(block.kv_input(hidden), positions)  # (B, heads, n_own, head_dim)
    k_own, v_own = cast(KVExchangeBlock, block).kv_from_wire(own)  # each (B, kv_heads, n_own, head_dim)
    k_remote, v_remote = cast(KVExchangeBlock, block).kv_from_wire(remote)  # each (B, kv_heads, S_remote, hd)
    own_part = attention_part(q, *attn.expand_kv(k_own, v_own), None, attn.scale, causal=True)
    remote_part = attention_part(q, *attn.expand_kv(k_remote, v_remote), remote_bias, attn.scale)
    heads = merge_parts(own_part, remote_part)  # (B, heads, n_own, head_dim)
    kv = (torch.cat([k_own, k_remote], dim=2), torch.cat([v_own, v_remote], dim=2))
    return block.after_attention(hidden, attn.project_out(heads)), kv, remote_bias


__all__ = ["block_with_remote", "causal_block_in_parts", "exchanged_states", "own_key_bias", "remote_key_bias"]
