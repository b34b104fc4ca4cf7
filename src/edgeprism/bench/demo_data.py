"""What the demo serves: real images with a probe that scores every answer, or seeded synthetic inputs.

`fashion-mnist` (the default for DINOv2-S/14 with its real weights from `make assets`): Fashion-MNIST test
images at the demo's image size, and the linear probe fitted on single-device features of training images
(`evaluate.eval_sets.fashion_mnist_probe`, cached); every answer's pooled [CLS] row gets a probe label, so
each row of the demo counts how many of its images the probe labelled correctly. `synthetic`: seeded random
inputs (random weights: speed only, no accuracy).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from edgeprism.models.base import Inputs, ReferenceModel
from edgeprism.models.synthetic import synthetic_inputs

DemoDataName = Literal["synthetic", "fashion-mnist"]
DEMO_DATA: tuple[str, ...] = ("synthetic", "fashion-mnist")


class DemoData:
    """Inputs for a batch size, and how many answers of a batch the probe gets right (None: no labels)."""

    def __init__(self, name: str, model: ReferenceModel, image_size: int | None = None, seed: int = 0) -> None:
        if name not in DEMO_DATA:
            raise ValueError(f"demo data {name!r}: choose one of {', '.join(DEMO_DATA)}")
        self.name = name
        self.model = model
        self.image_size = image_size
        self.seed = seed
        self.probe: torch.nn.Linear | None = None
        self.images = self.labels = None
        if name == "fashion-mnist":
            from edgeprism.assets.datasets import fashion_mnist
            from edgeprism.evaluate.eval_sets import fashion_mnist_probe

            if model.config.modality != "image":
                raise ValueError(f"demo data fashion-mnist needs an image model; {model.config.name} reads text")
            self.images, self.labels = fashion_mnist("test")
            self.probe = fashion_mnist_probe(model, image_size=image_size or 224)

    def batch(self, batch: int, offset: int) -> tuple[Inputs, Tensor | None]:
        """`batch` rows: images offset.. of the test split (labels too), or seeded synthetic inputs."""
        if self.images is None or self.labels is None:
            return synthetic_inputs(self.model.config, batch, image_size=self.image_size, seed=self.seed + batch), None
        from edgeprism.assets.datasets import to_dinov2_input

        index = [(offset + i) % len(self.images) for i in range(batch)]
        pixels = to_dinov2_input(self.images[index], self.image_size or 224)
        return {"pixel_values": pixels}, torch.from_numpy(self.labels[index].astype("int64"))

    def correct(self, outputs: dict[str, Tensor], labels: Tensor | None) -> int | None:
        """How many rows the probe labels correctly from their pooled output (None without labels)."""
        if self.probe is None or labels is None:
            return None
        with torch.no_grad():
            predicted = self.probe(outputs["pooled"].to(torch.float32).cpu()).argmax(-1)
        return int((predicted == labels).sum())


__all__ = ["DEMO_DATA", "DemoData", "DemoDataName"]
