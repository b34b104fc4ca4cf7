"""One entry per model family: everything the rest of edgeprism may know about a family.

Like transformers' `AutoConfig` mapping or timm's `register_model`: code outside `models/` never asks
`family == "gpt2"`; it asks the family's entry (`get_family(config.family)`, or the derived
`config.causal` / `config.modality`). The built-in families register themselves in
`models/families.py`; a new family registers its entry with `register_family` from anywhere (a test
file does: tests/test_toy_family.py). docs/ADDING.md lists the steps.

This module imports nothing from the models (not even for type names), so `models/config.py` can
derive `ModelConfig.causal` from it without an import circle; `Config` below stands for
`models.config.ModelConfig` and `model_class` builds a `models.base.ReferenceModel`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

Modality = Literal["image", "text"]
Config = Any
"""A `models.config.ModelConfig` (not imported: config.py imports this module)."""


@dataclass(frozen=True)
class CheckpointNames:
    """How a transformers checkpoint's tensor names map to ours (`models.loading.convert_hf_state_dict`
    reads it, `calibrate.checkpoint.to_hf_state_dict` inverts it). Names are relative: `top` maps HF stems
    outside the layers (after any task-head prefix is stripped) to ours; `layers(config)` maps a name
    relative to HF's layer i to ours relative to `blocks.i`."""

    layer_prefix: str
    """HF's layer list, e.g. "encoder.layer." or GPT-2's "h."."""
    top: Mapping[str, str]
    layers: Callable[[Config], Mapping[str, str]]
    fused_qkv: str = ""
    """HF's fused query/key/value projection relative to a layer (GPT-2's "attn.c_attn"), split into
    our attn.query / attn.key / attn.value; empty when HF keeps them apart."""
    conv1d: bool = False
    """HF stores 2-D layer weights as (in, out) (GPT-2's Conv1D); nn.Linear wants (out, in)."""


SyntheticInputs = Callable[[Config, int, torch.Generator, "int | None", "int | None", bool], dict[str, Tensor]]
"""(config, batch, generator, seq_len, image_size, padded) -> a seeded request (models/synthetic.py)."""


@dataclass(frozen=True)
class FamilyEntry:
    """A model family as the rest of edgeprism sees it. Its blocks must fit `models.base.Block`."""

    name: str
    """The `ModelConfig.family` value, e.g. "bert"."""
    model_class: type[nn.Module]
    """Built as `model_class(config)`; a `ReferenceModel` whose blocks fit the `Block` protocol."""
    modality: Modality
    """"image": requests carry pixel_values and `image_size`; "text": token ids and `seq_len`."""
    causal: bool
    """A decoder: each token attends to earlier ones only (the transform sends forward only, the cost
    model charges one hop per layer, outputs come from the last position, `generate` is allowed)."""
    input_keys: tuple[str, ...]
    """The request keys the model accepts, the first one required (e.g. input_ids, attention_mask)."""
    synthetic_inputs: SyntheticInputs
    """Seeded random requests for tests, profiling and benchmarks."""
    checkpoint: CheckpointNames | None = None
    """transformers checkpoint names; None: the family loads no HF checkpoints."""
    hf_model_types: tuple[str, ...] = ()
    """config.json `model_type` values `config_from_hf` reads (e.g. ("vit", "dinov2"))."""
    config_from_hf: Callable[[dict, str], Config] | None = None
    """(transformers config.json, preset name) -> ModelConfig."""
    hf_config: Callable[[Config], dict] | None = None
    """ModelConfig -> the config.json `config_from_hf` reads back (writing checkpoints)."""
    reference_twin: Callable[[Config], nn.Module] | None = None
    """ModelConfig -> the randomly initialised transformers model computing the same function
    (`bench.transformers_twin` copies our weights into it); None: no twin."""
    exchange_width: Callable[[Config], int] | None = None
    """ModelConfig -> features per token a rank sends per layer, when the family's blocks exchange their
    keys and values (`models.base.KVExchangeBlock`: 2 · kv_heads · head_dim for Llama); None: they send
    hidden-state vectors (hidden_size). The cost model charges this width (`ModelConfig.exchange_width`)."""
    pipeline_keys: tuple[str, ...] = field(default=())
    """The keys the pipeline peer passes between stages as positional tensors (unpadded requests);
    empty: the `input_keys` without attention_mask."""

    def __post_init__(self) -> None:
        if self.modality not in ("image", "text"):
            raise ValueError(f"family {self.name!r}: modality {self.modality!r} must be 'image' or 'text'")
        if not self.input_keys:
            raise ValueError(f"family {self.name!r} names no input keys; give at least the required one")

    @property
    def stage_keys(self) -> tuple[str, ...]:
        return self.pipeline_keys or tuple(k for k in self.input_keys if k != "attention_mask")


_FAMILIES: dict[str, FamilyEntry] = {}


def register_family(entry: FamilyEntry) -> FamilyEntry:
    """Make `entry` known under `entry.name` (re-registering the same name replaces it)."""
    _FAMILIES[entry.name] = entry
    return entry


def get_family(name: str) -> FamilyEntry:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; registered families: {', '.join(sorted(_FAMILIES))} "
                         f"(register one with edgeprism.models.registry.register_family)") from None


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def family_for_hf(model_type: str | None) -> FamilyEntry:
    """The family whose `hf_model_types` include a config.json's `model_type`."""
    for entry in _FAMILIES.values():
        if model_type in entry.hf_model_types and entry.config_from_hf is not None:
            return entry
    supported = "; ".join(f"{e.name} ({', '.join(e.hf_model_types)})" for e in sorted(
        _FAMILIES.values(), key=lambda e: e.name) if e.hf_model_types and e.config_from_hf is not None)
    raise ValueError(f"config.json has model_type {model_type!r}, which edgeprism cannot load or split; supported "
                     f"families (model_type): {supported}")


__all__ = [
    "CheckpointNames",
    "FamilyEntry",
    "Modality",
    "family_for_hf",
    "get_family",
    "list_families",
    "register_family",
]
