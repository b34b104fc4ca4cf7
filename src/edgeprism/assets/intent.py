"""The 157-way intent head over MiniLM sentence embeddings, read from a plain ``.npz`` (never unpickled here).

Source: rag-intent-classifier 1.0.7's ``models/LogisticRegression.joblib`` (scikit-learn multinomial logistic
regression, C=3, trained on all-MiniLM-L6-v2 sentence embeddings of CLINC150 plus six routing meta-intents),
converted once by ``edgeprism.assets.convert.convert_intent_head``. Its prediction is the argmax of the affine
logits, which is all this class computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True, eq=False)
class IntentHead:
    """Affine classifier: ``logits = embeddings @ coef.T + intercept``; ``labels[argmax]`` is the intent name."""

    coef: np.ndarray
    """(num_classes, embedding_dim) float32."""
    intercept: np.ndarray
    """(num_classes,) float32."""
    labels: tuple[str, ...]
    """Human-readable intent name of each class, in ``coef`` row order."""

    def __post_init__(self) -> None:
        num_classes, _ = self.coef.shape
        if self.intercept.shape != (num_classes,) or len(self.labels) != num_classes:
            raise ValueError(
                f"intent head has coef {self.coef.shape}, intercept {self.intercept.shape} and "
                f"{len(self.labels)} labels; they must agree on the number of classes"
            )

    @property
    def num_classes(self) -> int:
        return self.coef.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.coef.shape[1]

    @classmethod
    def load(cls, path: str | Path) -> IntentHead:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                coef=data["coef"].astype(np.float32),
                intercept=data["intercept"].astype(np.float32),
                labels=tuple(str(label) for label in data["labels"]),
            )

    def save(self, path: str | Path) -> None:
        np.savez(path, coef=self.coef, intercept=self.intercept, labels=np.array(self.labels, dtype=np.str_))

    def logits(self, embeddings):
        """Logits for (B, embedding_dim) embeddings — L2-normalised MiniLM sentence embeddings. Returns a numpy
        array for numpy input and a float32 torch tensor (same device) for torch input."""
        if hasattr(embeddings, "detach"):  # torch.Tensor, without importing torch here
            import torch

            self._check_dim(tuple(embeddings.shape))
            coef = torch.from_numpy(self.coef).to(embeddings.device)
            intercept = torch.from_numpy(self.intercept).to(embeddings.device)
            return embeddings.detach().float() @ coef.T + intercept  # (B, num_classes)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        self._check_dim(embeddings.shape)
        return embeddings @ self.coef.T + self.intercept  # (B, num_classes)

    def predict_index(self, embeddings) -> np.ndarray:
        logits = self.logits(embeddings)
        if hasattr(logits, "detach"):
            logits = logits.cpu().numpy()
        return np.argmax(logits, axis=-1)

    def predict(self, embeddings) -> list[str]:
        """Intent name for each embedding row."""
        return [self.labels[i] for i in self.predict_index(embeddings)]

    def _check_dim(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 2 or shape[1] != self.embedding_dim:
            raise ValueError(
                f"intent head takes (batch, {self.embedding_dim}) sentence embeddings; got shape {shape}"
            )
