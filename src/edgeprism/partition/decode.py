"""What a rank keeps of a request after its last block, and greedy decoding from the last rank's cache
(causal models; docs/ARCHITECTURE.md rule 6): its own exact K/V plus the K/V of the vectors it received."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from edgeprism.models.base import ReferenceModel, block_kv, call_block
from edgeprism.models.common import key_padding_bias
from edgeprism.partition.ranges import TokenRange


@dataclass
class ShardState:
    """One rank's part of a request after the last block."""

    token_range: TokenRange
    hidden: Tensor  # (B, n_own, d), after the model's final norm
    valid: Tensor  # (B, n_own) bool
    kv_cache: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    """Per layer (k, v) over [own tokens ; received vectors] — kept for decoding (causal models)."""
    remote_bias: Tensor | None = None  # (B, 1, 1, S_remote) bias of the received vectors


def greedy_decode(model: ReferenceModel, state: ShardState, steps: int) -> Tensor:
    """Greedy tokens from the last rank's cache: own exact K/V + received vectors' K/V."""
    with torch.no_grad():
        batch = state.hidden.shape[0]
        position = state.token_range.end
        assert state.remote_bias is not None, "forward_shard sets it"
        prefix_bias = torch.cat([key_padding_bias(state.valid, state.hidden.dtype),
                                 state.remote_bias], dim=-1)  # (B, 1, 1, n_own + S_remote)
        token = model.logits(state.hidden[:, -1]).argmax(-1)  # (B,)
        generated = [token]
        cache = list(state.kv_cache)
        for step in range(1, steps):
            x = model.embed({"input_ids": token[:, None]}, position, position + 1)  # (B, 1, d)
            bias = torch.cat([prefix_bias, prefix_bias.new_zeros(batch, 1, 1, step)], dim=-1)
            here = torch.arange(position, position + 1, device=x.device)  # the new token's absolute position
            for layer, block in enumerate(model.block_list()):
                k_new, v_new = block_kv(block, x, here)
                k, v = (torch.cat([cache[layer][0], k_new], dim=2), torch.cat([cache[layer][1], v_new], dim=2))
                cache[layer] = (k, v)  # (B, kv_heads, n_own + S_remote + step, head_dim)
                x = call_block(block, x, bias, (k, v), here)
            token = model.logits(model.finish(x)[:, -1]).argmax(-1)
            generated.append(token)
            position += 1
        return torch.stack(generated, dim=1)  # (B, steps)


__all__ = ["ShardState", "greedy_decode"]
