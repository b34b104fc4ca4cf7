"""What the API needs from a model's input/output adapter (`edgeprism.inputs.ModelIO` fulfils it).

Declared here as a Protocol so that the API does not depend on how texts are tokenized or images
decoded, and tests can pass a small real adapter of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from torch import Tensor

Task = Literal["text-encoder", "image-encoder", "text-decoder"]


class ModelIOLike(Protocol):
    """Texts and images in, embeddings / labels / text out, for one served model.

    `encode_texts` and `encode_images` raise ValueError (with the numbers) for a text that is too long
    or an image that cannot be decoded; the API answers that request with a 400. `embeddings` and
    `classify` receive the engine's outputs for exactly the rows of `inputs` (no "hidden": the API
    does not gather hidden states), `classify` returns None for a model without a classifier."""

    task: Task
    model_name: str
    max_tokens: int
    eos_token_id: int | None

    def encode_texts(self, texts: Sequence[str], max_tokens: int | None = None) -> dict[str, Tensor]: ...

    def encode_images(self, blobs: Sequence[bytes]) -> dict[str, Tensor]: ...

    def embeddings(self, outputs: dict[str, Tensor], inputs: dict[str, Tensor]) -> Tensor: ...

    def classify(self, outputs: dict[str, Tensor], inputs: dict[str, Tensor],
                 top_k: int = 5) -> list[list[tuple[str, float]]] | None: ...

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]: ...

    def decode_tokens(self, ids: Sequence[int]) -> str: ...


__all__ = ["ModelIOLike", "Task"]
