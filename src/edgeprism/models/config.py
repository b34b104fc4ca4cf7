"""Typed, frozen model configurations and the registry of named presets."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from edgeprism.models.registry import Modality, get_family

RopeType = Literal["default", "linear", "llama3"]
"""Rotary frequency scalings the Llama family reads (transformers' `rope_type`)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""ImageNet channel statistics of x / 255 (torchvision's and transformers' IMAGENET_DEFAULT_MEAN/STD): what
DINOv2 and the default image preprocessing normalise with (inputs/image.py, assets/datasets.py,
models/synthetic.py). Here, in the lowest layer, so that each of them reads the one definition."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one reference model. Sizes are counts; eps is LayerNorm's epsilon."""

    name: str
    family: str
    """A registered family (`models.registry`): "vit", "bert", "gpt2", "llama", or one registered from outside."""
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float = 1e-12
    """Epsilon of the block norms: LayerNorm's, or RMSNorm's for the Llama family."""
    hidden_act: Literal["gelu", "gelu_new", "gelu_tanh", "silu"] = "gelu"
    # --- ViT ---
    image_size: int = 224
    """Native input side in pixels; other sides interpolate the position embeddings (must divide by patch)."""
    patch_size: int = 16
    num_channels: int = 3
    layerscale: bool = False
    """DINOv2-style per-channel scaling of each residual branch."""
    position_grid: int = 0
    """Side of the stored position-embedding grid (0 = image_size // patch_size)."""
    pooler: Literal["dense_tanh", "cls", "none"] = "dense_tanh"
    """ViT/BERT pooled output: tanh(dense([CLS])) as in ViTModel/BertModel, or [CLS] itself (DINOv2)."""
    # --- text ---
    vocab_size: int = 0
    max_positions: int = 0
    type_vocab_size: int = 2
    pad_token_id: int = 0
    position_offset: int = 0
    """Index of the first token's position embedding: RoBERTa-style encoders start at pad_token_id + 1
    (`max_positions` counts the usable positions after it). Left out of `config_hash` at its default."""
    # --- decoders with rotary positions (Llama family); left out of `config_hash` at their defaults ---
    num_kv_heads: int = 0
    """Key/value heads of grouped-query attention (0 = num_heads: plain multi-head attention)."""
    rope_theta: float = 10000.0
    """Rotary base (transformers' `rope_theta`)."""
    rope_type: RopeType = "default"
    """Rotary frequency scaling (transformers' `rope_scaling["rope_type"]`); its numbers in `rope_scaling`."""
    rope_scaling: tuple[tuple[str, float], ...] = ()
    """The scaling's parameters as (name, value) pairs: `factor` ("linear"); `factor`, `low_freq_factor`,
    `high_freq_factor`, `original_max_position_embeddings` ("llama3")."""
    tie_word_embeddings: bool = True
    """The language-model head reuses the token embeddings (GPT-2 always does)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads (grouped-query attention shares each among num_heads // kv_heads query heads)."""
        return self.num_kv_heads or self.num_heads

    @property
    def exchanges_kv(self) -> bool:
        """The family's blocks send rotated keys and values (`models.base.KVExchangeBlock`), so a receiver
        projects nothing for what it receives."""
        return get_family(self.family).exchange_width is not None

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of one MLP: 3 for SwiGLU (gate, up, down; the "silu" blocks here), else 2."""
        return 3 if self.hidden_act == "silu" else 2

    @property
    def exchange_width(self) -> int:
        """Features per token a rank sends per layer, as the family's blocks declare it (`FamilyEntry.
        exchange_width`; the hidden size unless the blocks exchange keys and values)."""
        width = get_family(self.family).exchange_width
        return self.hidden_size if width is None else width(self)

    @property
    def causal(self) -> bool:
        """A decoder (its family's entry says so): tokens attend to earlier ones only."""
        return get_family(self.family).causal

    @property
    def modality(self) -> Modality:
        """"image" (pixel_values, image_size) or "text" (token ids, seq_len), from the family's entry."""
        return get_family(self.family).modality

    @property
    def grid(self) -> int:
        return self.position_grid or self.image_size // self.patch_size

    def num_tokens(self, image_size: int | None = None, seq_len: int | None = None) -> int:
        """Tokens one request row carries: patches + [CLS] for an image model, the sequence length for text."""
        if self.modality == "image":
            side = (image_size or self.image_size) // self.patch_size
            return side * side + 1
        if seq_len is None:
            raise ValueError(f"{self.name} is a text model: give seq_len")
        return seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Stable short hash of the architecture (the name excluded), recorded in profiles."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        payload = {k: v for k, v in self.to_dict().items()
                   if k != "name" and not (k in _HASH_OMITS_AT_DEFAULT and v == defaults[k])}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_kv_heads < 0 or self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope scaling type {self.rope_type!r} is not supported; use none, 'linear' or 'llama3'")


_HASH_OMITS_AT_DEFAULT = ("position_offset", "num_kv_heads", "rope_theta", "rope_type", "rope_scaling",
                          "tie_word_embeddings")
"""Fields added after profiles were recorded: at their defaults they leave older presets' hashes unchanged."""


_PRESETS: dict[str, ModelConfig] = {}


def register(config: ModelConfig) -> ModelConfig:
    _PRESETS[config.name] = config
    return config


def get_config(name: str) -> ModelConfig:
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_PRESETS))}") from None


def list_presets() -> list[str]:
    return sorted(_PRESETS)


# Tiny configurations for tests: random weights, seconds to run.
register(ModelConfig("vit-tiny-test", "vit", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                     layer_norm_eps=1e-12, image_size=32, patch_size=8))
register(ModelConfig("dinov2-tiny-test", "vit", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                     layer_norm_eps=1e-6, image_size=28, patch_size=7, layerscale=True, position_grid=6,
                     pooler="cls"))
register(ModelConfig("bert-tiny-test", "bert", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                     vocab_size=1000, max_positions=128))
register(ModelConfig("gpt2-tiny-test", "gpt2", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                     layer_norm_eps=1e-5, hidden_act="gelu_new", vocab_size=1000, max_positions=128, pooler="none"))
# Real sizes (Dosovitskiy et al. 2021; Devlin et al. 2019; Radford et al. 2019; Wang et al. 2020; Oquab et al. 2023).
register(ModelConfig("vit-base-patch16-224", "vit", hidden_size=768, num_layers=12, num_heads=12,
                     intermediate_size=3072, layer_norm_eps=1e-12))
register(ModelConfig("vit-small-patch16-224", "vit", hidden_size=384, num_layers=12, num_heads=6,
                     intermediate_size=1536, layer_norm_eps=1e-6))
register(ModelConfig("dinov2-s14", "vit", hidden_size=384, num_layers=12, num_heads=6, intermediate_size=1536,
                     layer_norm_eps=1e-6, image_size=224, patch_size=14, layerscale=True, position_grid=37,
                     pooler="cls"))
register(ModelConfig("bert-base", "bert", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                     vocab_size=30522, max_positions=512))
register(ModelConfig("minilm-l6", "bert", hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                     vocab_size=30522, max_positions=512))
register(ModelConfig("gpt2-124m", "gpt2", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                     layer_norm_eps=1e-5, hidden_act="gelu_new", vocab_size=50257, max_positions=1024,
                     pooler="none"))
# The project's own byte-level GPT-2 fixture (package data: edgeprism/assets/gpt2-shakespeare; docs/DATA.md).
register(ModelConfig("gpt2-shakespeare", "gpt2", hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
                     layer_norm_eps=1e-5, hidden_act="gelu_new", vocab_size=257, max_positions=256, pooler="none"))
# A tiny ViT for Fashion-MNIST (28 x 28 grey, patch 4: 49 patches + [CLS]), trained here from scratch by
# `edgeprism.calibrate.tasks.train_fashion_vit` into the cache (docs/CALIBRATION.md); pooled = final-normed [CLS].
register(ModelConfig("vit-fmnist-tiny", "vit", hidden_size=64, num_layers=4, num_heads=4, intermediate_size=256,
                     layer_norm_eps=1e-6, image_size=28, patch_size=4, num_channels=1, pooler="cls"))
# Llama family. A tiny decoder for tests whose grouped K/V (2 x 2 heads x 8 = 32) is narrower than d = 64,
# as in real models; and SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json; weights: docs/DATA.md).
register(ModelConfig("llama-tiny", "llama", hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2,
                     intermediate_size=128, layer_norm_eps=1e-5, hidden_act="silu", vocab_size=1000,
                     max_positions=1024, rope_theta=10000.0, tie_word_embeddings=False, pooler="none"))
register(ModelConfig("smollm2-135m", "llama", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                     intermediate_size=1536, layer_norm_eps=1e-5, hidden_act="silu", vocab_size=49152,
                     max_positions=8192, rope_theta=100000.0, tie_word_embeddings=True, pooler="none"))
