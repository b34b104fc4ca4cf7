"""Small real model adapters for the API tests (the `ModelIOLike` contract of edgeprism.api):
a `tokenizers` WordLevel tokenizer over a tiny model's vocabulary, and Pillow images resized and
normalised for a tiny ViT. Not a fake: they tokenize and decode for real, just with a made-up vocabulary."""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from torch import Tensor

WORDS = ("the quick brown fox jumps over lazy dog a model splits tokens across edge devices and each rank owns "
         "positions while codecs compress what crosses link between them cat sat on mat").split()
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]")


class WordIO:
    """Texts for bert-tiny-test / gpt2-tiny-test: whitespace words, ids from a fixed vocabulary of
    `vocab_size` entries. Encoder rows are [CLS] words [SEP], right-padded with an attention mask;
    decoder prompts are the words alone."""

    def __init__(self, task: str, model_name: str, vocab_size: int, max_tokens: int,
                 labels: Sequence[str] | None = None, eos: bool = False) -> None:
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel
        from tokenizers.pre_tokenizers import Whitespace

        names = list(SPECIALS) + list(dict.fromkeys(WORDS))
        names += [f"w{i}" for i in range(vocab_size - len(names))]
        vocab = {name: i for i, name in enumerate(names[:vocab_size])}
        self.tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
        self.tokenizer.pre_tokenizer = Whitespace()
        self.task = task
        self.model_name = model_name
        self.max_tokens = max_tokens
        self.eos_token_id = vocab["[EOS]"] if eos else None
        self.labels = tuple(labels) if labels else None
        self._head = torch.randn(64, len(self.labels), generator=torch.Generator().manual_seed(0)) \
            if self.labels else None

    def encode_texts(self, texts: Sequence[str], max_tokens: int | None = None) -> dict[str, Tensor]:
        limit = max_tokens or self.max_tokens
        rows = [[2, *self.tokenizer.encode(text).ids, 3] for text in texts]
        for i, row in enumerate(rows):
            if len(row) > limit:
                raise ValueError(f"text {i} has {len(row)} tokens; {self.model_name} takes at most {limit}")
        longest = max(len(row) for row in rows)
        ids = torch.tensor([row + [0] * (longest - len(row)) for row in rows])  # (B, T)
        mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in rows])
        return {"input_ids": ids, "attention_mask": mask}

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(self.tokenizer.encode(text).ids) + 2 for text in texts]

    def encode_images(self, blobs: Sequence[bytes]) -> dict[str, Tensor]:
        raise ValueError(f"{self.model_name} takes texts")

    def embeddings(self, outputs: dict[str, Tensor], inputs: dict[str, Tensor]) -> Tensor:
        return outputs["mean"]

    def classify(self, outputs, inputs, top_k: int = 5):
        if self._head is None:
            return None
        probs = torch.softmax(outputs["mean"].float() @ self._head, dim=-1)  # (B, labels)
        top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        return [[(self.labels[i], float(p)) for p, i in zip(ps.tolist(), ids.tolist())]
                for ps, ids in zip(top.values, top.indices)]

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer.encode(prompt).ids for prompt in prompts]

    def decode_tokens(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


class PillowIO:
    """Images for vit-tiny-test: decoded with Pillow, RGB, resized to `size`, scaled to [-1, 1]."""

    def __init__(self, model_name: str, size: int, labels: Sequence[str] | None = None) -> None:
        self.task = "image-encoder"
        self.model_name = model_name
        self.max_tokens = 0
        self.eos_token_id = None
        self.size = size
        self.labels = tuple(labels) if labels else None
        self._head = torch.randn(64, len(self.labels), generator=torch.Generator().manual_seed(1)) \
            if self.labels else None

    def encode_images(self, blobs: Sequence[bytes]) -> dict[str, Tensor]:
        from PIL import Image, UnidentifiedImageError

        images = []
        for i, blob in enumerate(blobs):
            try:
                image = Image.open(io.BytesIO(blob)).convert("RGB").resize((self.size, self.size))
            except (UnidentifiedImageError, OSError) as err:
                raise ValueError(f"image {i} ({len(blob)} bytes) could not be decoded: {err}") from None
            pixels = torch.tensor(list(image.getdata()), dtype=torch.float32).reshape(self.size, self.size, 3)
            images.append(pixels.permute(2, 0, 1) / 127.5 - 1.0)  # (3, H, W)
        return {"pixel_values": torch.stack(images)}  # (B, 3, H, W)

    def encode_texts(self, texts, max_tokens=None):
        raise ValueError(f"{self.model_name} takes images")

    def count_tokens(self, texts):
        raise ValueError(f"{self.model_name} takes images")

    def embeddings(self, outputs, inputs) -> Tensor:
        return outputs["pooled"]

    def classify(self, outputs, inputs, top_k: int = 5):
        if self._head is None:
            return None
        probs = torch.softmax(outputs["pooled"].float() @ self._head, dim=-1)
        top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        return [[(self.labels[i], float(p)) for p, i in zip(ps.tolist(), ids.tolist())]
                for ps, ids in zip(top.values, top.indices)]

    def encode_prompts(self, prompts):
        raise ValueError(f"{self.model_name} takes images")

    def decode_tokens(self, ids):
        raise ValueError(f"{self.model_name} takes images")


def png_bytes(seed: int, size: int = 40, kind: str = "PNG") -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
    out = io.BytesIO()
    Image.frombytes("RGB", (size, size), bytes(pixels.flatten().tolist())).save(out, format=kind)
    return out.getvalue()
