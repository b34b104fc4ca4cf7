"""What every reference model offers the position-wise transform, besides being a plain nn.Module.

A request's input is a dict of tensors (`pixel_values`; or `input_ids`, `attention_mask`,
`token_type_ids`). `split_input` cuts it into the raw slices each token range needs, `embed` turns a
slice into hidden states with absolute positions, and `blocks`/`finish` do the rest. `forward` is the
single-device reference built from exactly those pieces.

The contract is declared here, not discovered: `ReferenceModel` lists what the position-wise transform
(`partition/transform.py`) calls on a model, `Block` what it calls on each of `model.blocks`, and
`check_blocks` says which member a block lacks. A family's causality and modality come from its
registry entry (`models/registry.py`) through `config.causal` / `config.modality`.
"""

from __future__ import annotations

from typing import Protocol, cast, runtime_checkable

import torch
from torch import Tensor, nn

from edgeprism.models.common import CAUSAL_SQUARE, Bias, causal_bias, key_padding_bias
from edgeprism.models.config import ModelConfig

Inputs = dict[str, Tensor]


@runtime_checkable
class KVProjection(Protocol):
    """The attention of a block, as far as the transform reaches into it."""

    def project_kv(self, x_kv: Tensor) -> tuple[Tensor, Tensor]:
        """x_kv (B, T_kv, d) K/V inputs -> k, v, each (B, heads, T_kv, head_dim)."""
        ...


@runtime_checkable
class Block(Protocol):
    """What the position-wise transform needs from one Transformer block (`models/common.py`'s
    PreNormBlock and PostNormBlock fit it):

    - `kv_input(residual)`: what the K/V projections read for a residual-stream vector — the block's
      normalised input for pre-LN blocks, the residual itself for post-LN ones (own tokens and received
      vectors go through it alike);
    - `attn.project_kv(x_kv)`: the keys and values of those inputs;
    - `block(x, bias=..., kv=(k, v))`: the block's output for queries `x` (B, T_own, d) attending to the
      given keys/values, with `bias` (B, 1, T_own, T_kv) added to the attention logits; with `kv=None`
      it projects its own `x` (the single-device reference path).
    """

    attn: KVProjection

    def kv_input(self, residual: Tensor) -> Tensor: ...

    def __call__(self, x: Tensor, *, bias: Bias = None,
                 kv: tuple[Tensor, Tensor] | None = None) -> Tensor: ...


@runtime_checkable
class SplitAttention(Protocol):
    """An attention whose parts the transform can run separately (`SplitBlock`)."""

    @property
    def scale(self) -> float:
        """The logits' scale (1 / sqrt(head_dim))."""
        ...

    def project_kv(self, x_kv: Tensor) -> tuple[Tensor, Tensor]: ...

    def project_q(self, x_q: Tensor) -> Tensor:
        """x_q (B, T_q, d) -> q (B, heads, T_q, head_dim)."""
        ...

    def project_out(self, heads: Tensor) -> Tensor:
        """(B, heads, T_q, head_dim) attention output -> (B, T_q, d) through the output projection."""
        ...


@runtime_checkable
class SplitBlock(Protocol):
    """Optional, beside `Block`: a block whose attention the transform may split into parts (own keys while
    the exchange is in flight, then the received ones, merged exactly; `partition/overlap.py`). Queries read
    `kv_input(x)` like the keys do, the logits are `q · k * attn.scale + bias`, and
    `after_attention(x, attn.project_out(heads))` is what `block(x, bias=..., kv=...)` returns. Blocks without
    it (e.g. rotary attention that needs positions) run unsplit."""

    attn: SplitAttention

    def kv_input(self, residual: Tensor) -> Tensor: ...

    def after_attention(self, x: Tensor, attended: Tensor) -> Tensor: ...


@runtime_checkable
class KVExchangeBlock(Protocol):
    """A `Block` whose attention reads token positions (rotary) declares this as well, and its ranks then
    exchange keys and values instead of hidden states: each sender rotates its keys at its tokens' *global*
    positions, so a receiver never needs a remote token's position (a Segment Means vector has none), and a
    grouped-query block sends 2 · kv_heads · head_dim features per token (SmolLM2: 384 against d = 576).

    - `kv_width`: features per token on the wire; equal to `ModelConfig.exchange_width` (the family entry's
      `exchange_width`), which the cost model charges;
    - `wire_kv(residual, positions)`: (B, n, kv_width) = [keys ; values] of residual-stream vectors at absolute
      positions (n,), keys already rotated;
    - `kv_from_wire(wire)`: (k, v), each (B, kv_heads, n, head_dim), of such vectors (own or received);
    - `block(x, bias=..., kv=(k, v), positions=...)`: as `Block`, with the queries' absolute positions.
    """

    kv_width: int

    def wire_kv(self, residual: Tensor, positions: Tensor) -> Tensor: ...

    def kv_from_wire(self, wire: Tensor) -> tuple[Tensor, Tensor]: ...

    def __call__(self, x: Tensor, *, bias: Bias = None, kv: tuple[Tensor, Tensor] | None = None,
                 positions: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class SplitRotaryAttention(Protocol):
    """The attention of a `SplitKVBlock`, in the parts the transform runs separately."""

    @property
    def scale(self) -> float: ...

    def project_q(self, x_q: Tensor, positions: Tensor) -> Tensor:
        """x_q (B, T_q, d) normed inputs at absolute `positions` -> rotated q (B, heads, T_q, head_dim)."""
        ...

    def expand_kv(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """(B, kv_heads, T, head_dim) each -> (B, heads, T, head_dim): grouped heads repeated for the queries."""
        ...

    def project_out(self, heads: Tensor) -> Tensor: ...


@runtime_checkable
class SplitKVBlock(Protocol):
    """Optional, beside `KVExchangeBlock`: a rotary block whose attention the transform may run in two parts
    over disjoint key sets, merged exactly by their log-sum-exp (`partition/overlap.py`): a decoder rank's own
    keys under the square causal mask (the fused causal kernel) and the earlier ranks' received keys, which
    every own query sees. `after_attention(x, attn.project_out(heads))` is what `block(x, kv=...)` returns."""

    attn: SplitRotaryAttention

    def kv_input(self, residual: Tensor) -> Tensor: ...

    def after_attention(self, x: Tensor, attended: Tensor) -> Tensor: ...


def block_kv(block: Block, residual: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values of residual-stream vectors at absolute `positions` (T,), each (B, kv_heads, T, head_dim),
    through whichever contract the block declares."""
    if isinstance(block, KVExchangeBlock):
        return block.kv_from_wire(block.wire_kv(residual, positions))
    return block.attn.project_kv(block.kv_input(residual))


def call_block(block: Block, x: Tensor, bias: Bias, kv: tuple[Tensor, Tensor] | None,
               positions: Tensor) -> Tensor:
    """`block(x, bias=, kv=)` for queries at absolute `positions`; blocks with position embeddings
    (plain `Block`s) have them in `x` already, rotary ones (`KVExchangeBlock`) take them here."""
    if isinstance(block, KVExchangeBlock):
        return block(x, bias=bias, kv=kv, positions=positions)
    return block(x, bias=bias, kv=kv)


def check_blocks(model: nn.Module) -> None:
    """Raise ValueError naming the first block of `model` that does not fit the `Block` protocol."""
    blocks = getattr(model, "blocks", None)
    name = getattr(getattr(model, "config", None), "name", type(model).__name__)
    if blocks is None or len(blocks) == 0:
        raise ValueError(f"{name} has no `blocks`; a reference model keeps its Transformer blocks in an nn.ModuleList")
    for i, block in enumerate(blocks):
        missing = [m for m in ("kv_input", "attn") if not hasattr(block, m)]
        if not missing and not isinstance(block.attn, KVProjection):
            missing = ["attn.project_kv"]
        if missing:
            raise ValueError(f"{name}: block {i} ({type(block).__name__}) lacks {', '.join(missing)}; "
                             f"blocks must fit edgeprism.models.base.Block (see docs/ADDING.md)")
        config = getattr(model, "config", None)
        if config is not None:
            width = block.kv_width if isinstance(block, KVExchangeBlock) else config.hidden_size
            if width != config.exchange_width:
                raise ValueError(f"{name}: block {i} sends {width} features per token but the family entry declares "
                                 f"exchange_width {config.exchange_width}; make FamilyEntry.exchange_width agree")


class ReferenceModel(nn.Module):
    """A family's model (`FamilyEntry.model_class`): an nn.Module built from a ModelConfig whose
    `blocks` fit `Block`. The transform calls exactly the methods below."""

    config: ModelConfig
    blocks: nn.ModuleList

    def block_list(self) -> list[Block]:
        """`blocks` as the protocol the transform relies on (`check_blocks` checks it at build time)."""
        return cast("list[Block]", list(self.blocks))

    @property
    def causal(self) -> bool:
        """A decoder (from the family's registry entry): causal mask, output at the last position."""
        return self.config.causal

    # --- pieces the position-wise transform uses ---
    def validate_input(self, inputs: Inputs) -> int:
        """Raise ValueError for a malformed request; return its token count per row."""
        raise NotImplementedError

    def split_input(self, inputs: Inputs, token_start: int, token_end: int) -> Inputs:
        """The raw input a rank owning tokens [token_start, token_end) needs (and nothing more)."""
        raise NotImplementedError

    def pixel_channels(self) -> dict[str, int]:
        """Raw parts (keys of `split_input`'s result) that hold pixels: key -> number of channels, laid out
        channel-major in the part's last dimension (that many equal blocks). The scatter may send such a part
        as 8-bit levels, losslessly (compress/pixels.py); parts not named here (token ids, grid sizes) travel
        as they are. Text models name none."""
        return {}

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

    def logits(self, hidden: Tensor) -> Tensor:
        """Decoders only (`generate`): next-token logits (..., vocab) of finished hidden states."""
        raise ValueError(f"{self.config.name} has no language-model head; only decoders generate")

    # --- the single-device reference ---
    def forward(self, inputs: Inputs, num_tokens: int | None = None) -> dict[str, Tensor]:
        """The single-device reference. `num_tokens`: the caller already checked `inputs` (the engine's one
        check per request) and this is what `validate_input` returned."""
        num_tokens = self.validate_input(inputs) if num_tokens is None else num_tokens
        hidden = self.embed(inputs, 0, num_tokens)  # (B, T, d)
        valid = self.valid_mask(inputs, hidden.shape[0], num_tokens).to(hidden.device)
        bias: Bias
        if self.causal and bool(valid.all()):
            bias = CAUSAL_SQUARE  # the causal mask with no padding, on SDPA's fused causal path
        else:
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
