"""Reference GPT-2: token + position embeddings, causal pre-LN blocks, final LayerNorm, tied LM head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgeprism.models.base import Inputs, ReferenceModel
from edgeprism.models.bert import validate_text
from edgeprism.models.common import PreNormBlock
from edgeprism.models.config import ModelConfig


class GPT2(ReferenceModel):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe = nn.Embedding(config.max_positions, d)
        self.blocks = nn.ModuleList(PreNormBlock(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def validate_input(self, inputs: Inputs) -> int:
        return validate_text(self.config, inputs, {"input_ids", "attention_mask"})

    def split_input(self, inputs: Inputs, token_start: int, token_end: int) -> Inputs:
        part = {"input_ids": inputs["input_ids"][:, token_start:token_end].contiguous()}
        if "attention_mask" in inputs:
            part["attention_mask"] = inputs["attention_mask"][:, token_start:token_end].contiguous()
        return part

    def embed(self, part: Inputs, token_start: int, token_end: int) -> Tensor:
        ids = part["input_ids"]
        positions = torch.arange(token_start, token_end, device=ids.device)
        return self.wte(ids) + self.wpe(positions)  # (B, n_own, d)

    def finish(self, hidden: Tensor) -> Tensor:
        return self.norm(hidden)

    def logits(self, hidden: Tensor) -> Tensor:
        return hidden @ self.wte.weight.T  # tied LM head: (..., vocab)

    def head(self, last_row: Tensor) -> dict[str, Tensor]:
        return {"last": last_row, "logits_last": self.logits(last_row)}


def greedy_generate(model: ReferenceModel, inputs: Inputs, max_new_tokens: int) -> Tensor:
    """Single-device greedy decoding by full recomputation (the reference for distributed decode) of any
    decoder whose head gives `logits_last` (GPT-2, Llama)."""
    ids = inputs["input_ids"]
    generated = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = model({"input_ids": ids})["logits_last"].argmax(-1)  # (B,)
            generated.append(token)
            ids = torch.cat([ids, token[:, None]], dim=1)
    return torch.stack(generated, dim=1)  # (B, max_new_tokens)
