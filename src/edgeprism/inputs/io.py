"""`ModelIO`: what users send (strings, image file bytes) → input tensors, and outputs → answers.

`load_io(config, checkpoint)` reads only the checkpoint folder's own files (docs/INPUTS.md lists them):
``config.json``, ``tokenizer.json`` (or the byte-level convention), ``sentence_bert_config.json``,
``modules.json`` + the pooling config, ``preprocessor_config.json`` and the classifier files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from edgeprism.inputs.heads import Classifier, Pooling, read_classifier, read_pooling
from edgeprism.inputs.image import DEFAULT_MAX_PIXELS, ImagePreprocessor
from edgeprism.inputs.text import TextTokenizer, load_tokenizer, sentence_max_tokens
from edgeprism.models.config import ModelConfig

log = logging.getLogger(__name__)

Task = Literal["text-encoder", "image-encoder", "text-decoder"]


def task_of(config: ModelConfig) -> Task:
    """What a model does with inputs, from its family's declared modality and causality (any registered
    family, Llama's included): images are encoded, causal text is decoded, other text is encoded."""
    if config.modality == "image":
        return "image-encoder"
    return "text-decoder" if config.causal else "text-encoder"


@dataclass(frozen=True, eq=False)
class ModelIO:
    """Input encoding and output reading for one model; built by `load_io`."""

    task: Task
    model_name: str
    max_tokens: int
    """Text: the most tokens one row may have (special tokens included); images: 0."""
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    pad_token_id: int = 0
    tokenizer: TextTokenizer | None = None
    image: ImagePreprocessor | None = None
    pooling: Pooling = field(default_factory=Pooling)
    classifier: Classifier | None = None
    patch_size: int = 0

    def __str__(self) -> str:
        parts = [f"{self.model_name}: {self.task}"]
        if self.tokenizer is not None:
            parts.append(f"tokenizer {self.tokenizer.source}, at most {self.max_tokens} tokens")
        if self.image is not None:
            parts.append(f"images: {self.image}")
        if self.task != "text-decoder":
            parts.append(f"embedding {self.pooling}")
        parts.append(f"classifier {self.classifier}" if self.classifier else "no classifier")
        return "; ".join(parts)

    # --- text ---
    def encode_texts(self, texts: Sequence[str], max_tokens: int | None = None, *,
                     truncate: bool = False) -> dict[str, Tensor]:
        """``input_ids``/``attention_mask`` (+ ``token_type_ids`` for encoders), (B, T) int64, right-padded
        with the pad id to the longest row. Too-long texts raise, unless `truncate` cuts them to fit."""
        tokenizer = self._tokenizer("encode_texts")
        limit = self._token_limit(max_tokens)
        encoded = [tokenizer.encode(text, limit if truncate else None) for text in _check_texts(texts, "text")]
        for i, enc in enumerate(encoded):
            if enc.num_content == 0:
                raise ValueError(f"text {i} is empty: it has no tokens besides the special ones")
            if len(enc.ids) > limit:
                raise ValueError(f"text {i} has {len(enc.ids)} tokens; {self.model_name} takes at most {limit} "
                                 f"per text: shorten it, or pass truncate=True to cut it")
        num_tokens = max(len(enc.ids) for enc in encoded)
        ids = torch.full((len(encoded), num_tokens), self.pad_token_id, dtype=torch.int64)  # (B, T)
        mask = torch.zeros_like(ids)
        types = torch.zeros_like(ids)
        for row, enc in enumerate(encoded):
            ids[row, :len(enc.ids)] = torch.tensor(enc.ids, dtype=torch.int64)
            mask[row, :len(enc.ids)] = 1
            types[row, :len(enc.ids)] = torch.tensor(enc.type_ids, dtype=torch.int64)
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.task == "text-encoder":
            batch["token_type_ids"] = types
        return batch

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text takes, special tokens included, before any truncation."""
        tokenizer = self._tokenizer("count_tokens")
        return [tokenizer.encode(text).num_untruncated for text in _check_texts(texts, "text")]

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt (no padding). An empty prompt is [BOS] where the model has one."""
        tokenizer = self._tokenizer("encode_prompts", decoder=True)
        rows = []
        for i, prompt in enumerate(_check_texts(prompts, "prompt")):
            ids = list(tokenizer.encode(prompt).ids)
            if not ids and self.bos_token_id is not None:
                ids = [self.bos_token_id]
            if not ids:
                raise ValueError(f"prompt {i} is empty and {self.model_name} has no BOS token to start from")
            if len(ids) > self.max_tokens:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; {self.model_name} has {self.max_tokens} "
                                 f"positions: shorten it")
            rows.append(ids)
        return rows

    def decode_tokens(self, ids: Sequence[int]) -> str:
        """Text of generated token ids; special tokens (BOS/EOS, byte 256) are left out."""
        tokenizer = self._tokenizer("decode_tokens", decoder=True)
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside {self.model_name}'s vocabulary "
                             f"(0..{tokenizer.vocab_size - 1})")
        return tokenizer.decode(ids)

    # --- images ---
    def encode_images(self, blobs: Sequence[bytes]) -> dict[str, Tensor]:
        """``pixel_values`` (B, C, H, W) float32 from PNG/JPEG/... file bytes."""
        if self.image is None:
            raise ValueError(f"{self.model_name} is {_a(self.task)}; encode_images needs an image model")
        return {"pixel_values": self.image.batch(blobs)}

    # --- outputs ---
    def embeddings(self, outputs: dict[str, Tensor], inputs: dict[str, Tensor]) -> Tensor:
        """(B, d) float32 embedding of each row, pooled as the checkpoint says (`Pooling`)."""
        if self.task == "text-decoder":
            raise ValueError(f"{self.model_name} is a text-decoder; embeddings come from encoders")
        return self.pooling(outputs, inputs)

    def classify(self, outputs: dict[str, Tensor], inputs: dict[str, Tensor],
                 top_k: int = 5) -> list[list[tuple[str, float]]] | None:
        """Best `top_k` (label, softmax score) per row, best first; None when the checkpoint has no classifier."""
        if top_k < 1:
            raise ValueError(f"top_k is {top_k}; ask for at least 1 label")
        if self.classifier is None:
            return None
        return self.classifier.top_k(self.class_features(outputs, inputs), top_k)

    def class_features(self, outputs: dict[str, Tensor], inputs: dict[str, Tensor]) -> Tensor:
        """What the checkpoint's classifier reads for each row (its pooled embedding or a model output)."""
        assert self.classifier is not None, "class_features needs a checkpoint with a classifier"
        embeddings = self.embeddings(outputs, inputs) if self.classifier.input == "embedding" else None
        num_tokens = None
        if "pixel_values" in inputs and self.patch_size:
            height, width = inputs["pixel_values"].shape[-2:]
            num_tokens = (height // self.patch_size) * (width // self.patch_size) + 1
        return self.classifier.features(outputs, inputs, embeddings, num_tokens)

    # --- checks ---
    def _tokenizer(self, what: str, decoder: bool = False) -> TextTokenizer:
        if self.tokenizer is None or (decoder and self.task != "text-decoder"):
            kind = "a text-decoder" if decoder else "a text model"
            raise ValueError(f"{self.model_name} is {_a(self.task)}; {what} needs {kind}")
        return self.tokenizer

    def _token_limit(self, max_tokens: int | None) -> int:
        if max_tokens is None:
            return self.max_tokens
        least = self.tokenizer.num_special_tokens + 1
        if not least <= max_tokens <= self.max_tokens:
            raise ValueError(f"max_tokens is {max_tokens}; {self.model_name} takes {least}..{self.max_tokens}")
        return max_tokens


def _check_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"give a list of {what}s, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError(f"no {what}s given: the list is empty")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{what} {i} is of type {type(text).__name__}, not a string")
    return texts


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _first_id(value) -> int | None:
    """config.json token ids may be an int, a list (Llama 3's several EOS ids: the first is used) or null."""
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)


def load_io(config: ModelConfig, checkpoint: str | os.PathLike | None, *,
            max_pixels: int = DEFAULT_MAX_PIXELS) -> ModelIO:
    """The `ModelIO` of `config` (any registered family: `task_of`) with the files of the `checkpoint` folder
    (or None)."""
    task = task_of(config)
    folder = Path(checkpoint) if checkpoint is not None else None
    if folder is not None and not folder.is_dir():
        raise ValueError(f"checkpoint folder {folder} does not exist")
    hf_config: dict = {}
    if folder is not None and (folder / "config.json").is_file():
        hf_config = json.loads((folder / "config.json").read_text())
    classifier = read_classifier(folder, hf_config)
    if task == "image-encoder":
        io = _image_io(config, folder, classifier, max_pixels)
    else:
        if folder is None:
            raise ValueError(f"{config.name} is a text model: load_io needs its checkpoint folder with "
                             f"tokenizer.json (random-weight presets have no tokenizer); none was given")
        tokenizer = load_tokenizer(folder, hf_config, config.name, config.vocab_size)
        max_tokens = config.max_positions
        sentence_limit = sentence_max_tokens(folder)
        if sentence_limit is not None and task == "text-encoder":
            max_tokens = min(max_tokens, sentence_limit)
        io = ModelIO(task, config.name, max_tokens, eos_token_id=_first_id(hf_config.get("eos_token_id")),
                     bos_token_id=_first_id(hf_config.get("bos_token_id")), pad_token_id=config.pad_token_id,
                     tokenizer=tokenizer, pooling=read_pooling(folder) if task == "text-encoder" else Pooling(),
                     classifier=classifier)
    _check_classifier(io, config)
    log.info("inputs: %s", io)
    return io


def _image_io(config: ModelConfig, folder: Path | None, classifier: Classifier | None, max_pixels: int) -> ModelIO:
    path = folder / "preprocessor_config.json" if folder is not None else None
    if path is not None and path.is_file():
        image = ImagePreprocessor.from_config(json.loads(path.read_text()), config.num_channels, str(path),
                                              max_pixels)
    else:
        image = ImagePreprocessor.defaults(config.image_size, config.num_channels, max_pixels)
        log.warning("%s: no preprocessor_config.json in %s; images are resized to %dx%d (bilinear) and "
                    "normalised with ImageNet mean/std", config.name, folder or "(no checkpoint)",
                    config.image_size, config.image_size)
    size = image.output_size
    if size is None:
        raise ValueError(f"{image.source} gives images whose size depends on the input (shortest edge "
                         f"{image.shortest_edge}, no crop); {config.name} needs one fixed size")
    if size[0] != size[1] or size[0] % config.patch_size:
        raise ValueError(f"{image.source} makes {size[0]}x{size[1]} images; {config.name} takes square images "
                         f"whose side is a multiple of {config.patch_size}")
    return ModelIO("image-encoder", config.name, 0, image=image, pooling=read_pooling(folder),
                   classifier=classifier, patch_size=config.patch_size)


def _check_classifier(io: ModelIO, config: ModelConfig) -> None:
    head = io.classifier
    if head is None:
        return
    d = config.hidden_size
    expected = {"embedding": d * len(io.pooling.modes), "cls+patch_mean": 2 * d}.get(head.input, d)
    if head.weight.shape[1] != expected:
        raise ValueError(f"{head.source} takes {head.weight.shape[1]} features of {head.input}, but "
                         f"{config.name} gives {expected}")
