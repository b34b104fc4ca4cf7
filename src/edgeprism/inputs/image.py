"""Image bytes → ``pixel_values``, as the checkpoint's ``preprocessor_config.json`` says, with Pillow and numpy.

The arithmetic mirrors transformers' PIL-backend (slow) image processors step by step, so the result equals
``AutoImageProcessor.from_pretrained(folder, backend="pil")`` to float32 rounding:

1. decode (PNG, JPEG, GIF, BMP, WebP only; first frame; no EXIF rotation, as transformers);
2. convert to RGB, compositing transparency onto white (``convert_to_rgb``); grey ("L") for 1-channel models;
3. resize with PIL on uint8: to ``size.height × size.width`` (ViTImageProcessor) or the shorter side to
   ``size.shortest_edge``, the longer to ``int(shortest_edge * long / short)`` (BitImageProcessor / DINOv2);
4. center crop to ``crop_size`` (zero padding where the image is smaller);
5. ``x * rescale_factor`` in float64, cast to float32; 6. ``(x - image_mean) / image_std`` in float32.

A folder without the file gets a square resize to the config's ``image_size`` (bilinear), 1/255 and ImageNet
mean/std; `load_io` logs a warning saying so.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from edgeprism.models.config import IMAGENET_MEAN, IMAGENET_STD

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
"""Formats Pillow may decode here; others (EPS, which runs Ghostscript, TIFF, ...) are refused."""
DEFAULT_MAX_PIXELS = 40_000_000
"""Largest decoded image accepted (width x height), below Pillow's own 89 M-pixel bomb warning."""
BILINEAR, BICUBIC = 2, 3  # PIL.Image.Resampling values, as preprocessor_config.json stores them
_SUPPORTED_KEYS = {"do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                   "do_normalize", "image_mean", "image_std", "do_convert_rgb", "image_processor_type",
                   "processor_class", "feature_extractor_type", "default_to_square"}


def _require_pillow():
    try:
        from PIL import Image
    except ImportError as exc:
        raise ModuleNotFoundError("decoding images needs Pillow: pip install 'edgeprism[serve]' "
                                  "(or pip install pillow)") from exc
    return Image


@dataclass(frozen=True)
class ImagePreprocessor:
    """What to do to one decoded image. Sizes are pixels as (height, width)."""

    resize_to: tuple[int, int] | None
    """Fixed output size of the resize (ViTImageProcessor), or None."""
    shortest_edge: int | None
    """Resize keeping the aspect ratio so the shorter side is this (BitImageProcessor), or None."""
    resample: int
    crop: tuple[int, int] | None
    rescale_factor: float | None
    image_mean: tuple[float, ...] | None
    image_std: tuple[float, ...] | None
    mode: Literal["RGB", "L"] = "RGB"
    max_pixels: int = DEFAULT_MAX_PIXELS
    source: str = "defaults"

    @classmethod
    def from_config(cls, config: dict, num_channels: int = 3, source: str = "preprocessor_config.json",
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> ImagePreprocessor:
        unknown = sorted(k for k, v in config.items() if k.startswith("do_") and v and k not in _SUPPORTED_KEYS)
        if unknown:
            raise ValueError(f"{source} asks for {unknown}, which edgeprism's image preprocessing does not do")
        kind = str(config.get("image_processor_type") or config.get("feature_extractor_type") or "")
        resize_to = shortest_edge = None
        if config.get("do_resize", True):
            size = config.get("size", {"height": 224, "width": 224})
            if isinstance(size, int):  # old files: an int means a square, or the short side for Bit/CLIP
                to_square = config.get("default_to_square", not kind.startswith(("Bit", "CLIP")))
                size = {"height": size, "width": size} if to_square else {"shortest_edge": size}
            if set(size) == {"height", "width"}:
                resize_to = (int(size["height"]), int(size["width"]))
            elif set(size) == {"shortest_edge"}:
                shortest_edge = int(size["shortest_edge"])
            else:
                raise ValueError(f"{source} has size {size}; edgeprism resizes to {{height, width}} or "
                                 f"{{shortest_edge}} only")
        crop = None
        if config.get("do_center_crop", False):
            crop_size = config.get("crop_size", {"height": 224, "width": 224})
            if isinstance(crop_size, int):
                crop_size = {"height": crop_size, "width": crop_size}
            crop = (int(crop_size["height"]), int(crop_size["width"]))
        rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None
        mean = std = None
        if config.get("do_normalize", True):
            mean, std = _stats(config.get("image_mean", 0.5), num_channels), _stats(config.get("image_std", 0.5),
                                                                                    num_channels)
            if len(mean) != num_channels or len(std) != num_channels or min(std) <= 0:
                raise ValueError(f"{source} has image_mean {list(mean)} and image_std {list(std)}; the model takes "
                                 f"{num_channels} channels (std > 0)")
        return cls(resize_to, shortest_edge, int(config.get("resample", BILINEAR)), crop, rescale, mean, std,
                   "L" if num_channels == 1 else "RGB", max_pixels, source)

    @classmethod
    def defaults(cls, image_size: int, num_channels: int = 3,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> ImagePreprocessor:
        """Square bilinear resize to `image_size`, 1/255, ImageNet mean/std (their channel average if grey)."""
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if num_channels == 1:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        return cls((image_size, image_size), None, BILINEAR, None, 1 / 255, mean, std,
                   "L" if num_channels == 1 else "RGB", max_pixels, "defaults (no preprocessor_config.json)")

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it depends on the input image."""
        return self.crop or self.resize_to

    def __str__(self) -> str:
        size = (f"resize {self.resize_to[0]}x{self.resize_to[1]}" if self.resize_to else
                f"shortest edge {self.shortest_edge}" if self.shortest_edge else "no resize")
        crop = f", crop {self.crop[0]}x{self.crop[1]}" if self.crop else ""
        return f"{size} (resample {self.resample}){crop}, {self.mode}, from {self.source}"

    # --- per image ---
    def decode(self, blob: bytes, index: int = 0):
        """A loaded PIL image from PNG/JPEG/... bytes, or a ValueError naming image `index` and the reason."""
        Image = _require_pillow()
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise ValueError(f"image {index} is of type {type(blob).__name__}, not bytes of an image file")
        if len(blob) == 0:
            raise ValueError(f"image {index} is empty (0 bytes)")
        try:
            image = Image.open(io.BytesIO(blob), formats=FORMATS)
            width, height = image.size
            if width * height > self.max_pixels:
                raise ValueError(f"image {index} is {width}x{height} = {width * height} pixels; the limit is "
                                 f"{self.max_pixels} pixels")
            if width == 0 or height == 0:
                raise ValueError(f"image {index} has zero size ({width}x{height})")
            image.load()
        except Image.DecompressionBombError as err:
            raise ValueError(f"image {index} is too large to decode safely: {err}") from None
        except (OSError, SyntaxError, EOFError, struct.error) as err:  # UnidentifiedImageError is an OSError
            raise ValueError(f"image {index} is not a {'/'.join(FORMATS)} image Pillow can read: {err}") from None
        return image

    def to_mode(self, image):
        """RGB with transparency composited onto white (transformers' convert_to_rgb); grey for 1 channel."""
        Image = _require_pillow()
        if self.mode == "L" and image.mode == "L":
            return image
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        else:
            image = image.convert("RGB")
        return image.convert("L") if self.mode == "L" else image

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step (transformers' get_resize_output_image_size)."""
        if self.resize_to is not None:
            return self.resize_to
        if self.shortest_edge is None:
            return height, width
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def __call__(self, image) -> np.ndarray:
        """(C, H, W) float32 from a decoded PIL image."""
        image = self.to_mode(image)
        if self.resize_to is not None or self.shortest_edge is not None:
            height, width = self.resized_size(image.height, image.width)
            image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (C, H, W) uint8
        if self.crop is not None:
            pixels = _center_crop(pixels, *self.crop)
        if self.rescale_factor is not None:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        pixels = pixels.astype(np.float32, copy=False)
        if self.image_mean is not None:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
            pixels = (pixels - mean) / std
        return pixels

    def batch(self, blobs: Sequence[bytes]) -> Tensor:
        """(B, C, H, W) float32 ``pixel_values`` from image file bytes."""
        if isinstance(blobs, (bytes, bytearray)) or len(blobs) == 0:
            raise ValueError("give a non-empty list of images (bytes of image files)")
        arrays = [self(self.decode(blob, i)) for i, blob in enumerate(blobs)]
        sizes = {a.shape[1:] for a in arrays}
        if len(sizes) > 1:
            raise ValueError(f"images come out in {len(sizes)} sizes {sorted(sizes)} ({self}); a batch needs one")
        return torch.from_numpy(np.stack(arrays))  # (B, C, H, W)


def _stats(value, num_channels: int) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),) * num_channels
    return tuple(float(v) for v in value)


def _center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """transformers' center_crop on (C, H, W): offsets (H - h) // 2, zero padding where the image is smaller."""
    _, height, width = pixels.shape
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return pixels[:, top:top + crop_height, left:left + crop_width]
    new_height, new_width = max(crop_height, height), max(crop_width, width)
    padded = np.zeros((pixels.shape[0], new_height, new_width), dtype=pixels.dtype)
    top_pad, left_pad = math.ceil((new_height - height) / 2), math.ceil((new_width - width) / 2)
    padded[:, top_pad:top_pad + height, left_pad:left_pad + width] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[:, max(0, top):min(new_height, top + crop_height), max(0, left):min(new_width, left + crop_width)]
