"""Reference BERT encoder: word + position + token-type embeddings, post-LN blocks, pooler."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgeprism.models.base import Inputs, ReferenceModel
from edgeprism.models.common import PostNormBlock
from edgeprism.models.config import ModelConfig

TEXT_KEYS = {"input_ids", "attention_mask", "token_type_ids"}


def validate_text(config: ModelConfig, inputs: Inputs, allowed: set[str]) -> int:
    if "input_ids" not in inputs or not set(inputs) <= allowed:
        raise ValueError(f"{config.name} takes input_ids plus optional {sorted(allowed - {'input_ids'})}; "
                         f"got keys {sorted(inputs)}")
    ids = inputs["input_ids"]
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids has shape {tuple(ids.shape)} and dtype {ids.dtype}; "
                         f"give (batch, seq_len) integer token ids")
    batch, seq_len = ids.shape
    if seq_len > config.max_positions:
        raise ValueError(f"sequence of {seq_len} tokens is longer than {config.name}'s {config.max_positions} "
                         f"positions; truncate it to {config.max_positions}")
    if seq_len == 0 or batch == 0:
        raise ValueError(f"empty batch: input_ids has shape {tuple(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size:
        raise ValueError(f"token ids span [{int(ids.min())}, {int(ids.max())}]; {config.name}'s vocabulary "
                         f"has {config.vocab_size} ids (0..{config.vocab_size - 1})")
    for key in ("attention_mask", "token_type_ids"):
        if key in inputs and tuple(inputs[key].shape) != (batch, seq_len):
            raise ValueError(f"{key} has shape {tuple(inputs[key].shape)}; input_ids has {(batch, seq_len)}")
    if "attention_mask" in inputs:
        mask = inputs["attention_mask"]
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1")
        if bool((mask.sum(1) == 0).any()):
            raise ValueError("a row of attention_mask is all zeros: every request row needs a real token")
    return seq_len


class Bert(ReferenceModel):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d)
        self.position_embeddings = nn.Embedding(config.position_offset + config.max_positions, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.embed_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(PostNormBlock(config) for _ in range(config.num_layers))
        self.pooler = nn.Linear(d, d) if config.pooler == "dense_tanh" else None

    def validate_input(self, inputs: Inputs) -> int:
        seq_len = validate_text(self.config, inputs, TEXT_KEYS)
        if "token_type_ids" in inputs:
            types = inputs["token_type_ids"]
            if int(types.min()) < 0 or int(types.max()) >= self.config.type_vocab_size:
                raise ValueError(f"token_type_ids span [{int(types.min())}, {int(types.max())}]; "
                                 f"{self.config.name} has {self.config.type_vocab_size} types")
        return seq_len

    def split_input(self, inputs: Inputs, token_start: int, token_end: int) -> Inputs:
        ids = inputs["input_ids"]
        part = {"input_ids": ids[:, token_start:token_end].contiguous()}
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        part["attention_mask"] = mask[:, token_start:token_end].contiguous()
        # Row lengths let a rank find [SEP] (the last real token) without seeing other ranks' masks.
        part["lengths"] = mask.sum(1)
        if "token_type_ids" in inputs:
            part["token_type_ids"] = inputs["token_type_ids"][:, token_start:token_end].contiguous()
        return part

    def embed(self, part: Inputs, token_start: int, token_end: int) -> Tensor:
        ids = part["input_ids"]
        offset = self.config.position_offset  # RoBERTa-style: positions start at pad_token_id + 1
        positions = torch.arange(token_start + offset, token_end + offset, device=ids.device)
        types = part.get("token_type_ids")
        if types is None:
            types = torch.zeros_like(ids)
        hidden = self.word_embeddings(ids) + self.token_type_embeddings(types) + self.position_embeddings(positions)
        return self.embed_norm(hidden)  # (B, n_own, d)

    def anchor_mask(self, part: Inputs, token_start: int, token_end: int) -> Tensor:
        anchor = super().anchor_mask(part, token_start, token_end)
        if "lengths" in part:  # [SEP]: the last real token of each row
            positions = torch.arange(token_start, token_end, device=anchor.device)
            anchor |= positions[None, :] == (part["lengths"][:, None] - 1)
        return anchor

    def head(self, cls_row: Tensor) -> dict[str, Tensor]:
        pooled = cls_row if self.pooler is None else torch.tanh(self.pooler(cls_row))
        return {"cls": cls_row, "pooled": pooled}
