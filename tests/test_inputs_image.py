"""edgeprism.inputs for images: Pillow preprocessing vs transformers' PIL-backend image processors; bad bytes;
transformers classification heads."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import struct
import zlib

import numpy as np
import pytest
import torch

from edgeprism.inputs import ImagePreprocessor, load_io
from edgeprism.models.config import ModelConfig, get_config
from edgeprism.models.loading import build_model, config_from_hf, load_checkpoint

Image = pytest.importorskip("PIL.Image")
transformers = pytest.importorskip("transformers")

VIT_PREPROCESSOR = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                    "size": {"height": 32, "width": 32}, "resample": 2, "do_rescale": True,
                    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
                    "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}
DINOV2_PREPROCESSOR = {"image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
                       "resample": 3, "do_center_crop": True, "crop_size": {"height": 28, "width": 28},
                       "do_rescale": True, "rescale_factor": 0.00392156862745098, "do_normalize": True,
                       "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                       "do_convert_rgb": True}


def _png(array: np.ndarray, mode: str | None = None, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    smooth = np.clip(np.cumsum(rng.integers(-20, 21, (45, 61, 3)), axis=1) % 256, 0, 255).astype(np.uint8)
    rgba = np.concatenate([smooth, rng.integers(0, 256, (45, 61, 1), dtype=np.uint8)], axis=-1)
    palette = Image.fromarray(smooth).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=3)
    return {"rgb tall": _png(rng.integers(0, 256, (53, 37, 3), dtype=np.uint8)),
            "rgb wide": _png(smooth),
            "rgba": _png(rgba),
            "grey": _png(rng.integers(0, 256, (40, 29), dtype=np.uint8)),
            "jpeg": _png(smooth, fmt="JPEG", quality=90),
            "palette+transparency": buffer.getvalue(),
            "tiny": _png(rng.integers(0, 256, (5, 9, 3), dtype=np.uint8))}


def _folder(tmp_path, preprocessor: dict, model_type: str = "vit"):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return tmp_path


@pytest.mark.parametrize("preprocessor", [VIT_PREPROCESSOR, DINOV2_PREPROCESSOR], ids=["vit", "dinov2-bit"])
def test_pixels_equal_transformers_pil_processor(tmp_path, preprocessor):
    folder = _folder(tmp_path, preprocessor)
    config = ModelConfig("tiny-vit", "vit", 32, 1, 4, 64, image_size=preprocessor.get("crop_size", {}).get(
        "height", 32), patch_size=4)
    model_io = load_io(config, folder)
    reference = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    assert "Pil" in type(reference).__name__
    for name, blob in _images().items():
        ours = model_io.encode_images([blob])["pixel_values"]
        theirs = reference(images=[Image.open(io.BytesIO(blob))], return_tensors="pt")["pixel_values"]
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape, name
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0, msg=name)
    batch = model_io.encode_images(list(_images().values()))["pixel_values"]
    assert batch.shape == (7, 3, config.image_size, config.image_size)


def test_no_preprocessor_config_uses_image_size_and_imagenet_stats(caplog):
    with caplog.at_level(logging.WARNING, logger="edgeprism.inputs.io"):
        model_io = load_io(get_config("dinov2-tiny-test"), None)
    assert "no preprocessor_config.json" in caplog.text and "ImageNet mean/std" in caplog.text
    blob = _images()["rgb wide"]
    pixels = model_io.encode_images([blob])["pixel_values"]
    assert pixels.shape == (1, 3, 28, 28)
    resized = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB").resize((28, 28), Image.BILINEAR))
    expected = (resized / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    torch.testing.assert_close(pixels[0], torch.from_numpy(expected.transpose(2, 0, 1)).float(), atol=1e-5, rtol=0)
    grey = load_io(get_config("vit-fmnist-tiny"), None).encode_images([blob])["pixel_values"]
    assert grey.shape == (1, 1, 28, 28)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but carries almost no data (what a decompression bomb starts as)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_bad_image_bytes_raise_value_errors(tmp_path):
    model_io = load_io(ModelConfig("tiny-vit", "vit", 32, 1, 4, 64, image_size=32, patch_size=4),
                       _folder(tmp_path, VIT_PREPROCESSOR))
    good = _images()["rgb wide"]
    with pytest.raises(ValueError, match="image 2 is not a PNG/JPEG/GIF/BMP/WEBP image Pillow can read: "):
        model_io.encode_images([good, good, b"%PDF-1.4 not an image"])
    tiff = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiff, format="TIFF")
    with pytest.raises(ValueError, match="image 0 is not a PNG/JPEG"):
        model_io.encode_images([tiff.getvalue()])
    with pytest.raises(ValueError, match="image 1 is not a PNG/JPEG"):  # cut off mid-data
        model_io.encode_images([good, good[: len(good) // 2]])
    with pytest.raises(ValueError, match="image 1 is empty \\(0 bytes\\)"):
        model_io.encode_images([good, b""])
    with pytest.raises(ValueError, match="image 0 is of type str, not bytes of an image file"):
        model_io.encode_images(["cat.png"])
    with pytest.raises(ValueError, match="give a non-empty list of images"):
        model_io.encode_images([])
    with pytest.raises(ValueError, match="image 0 is 7000x7000 = 49000000 pixels; the limit is 40000000 pixels"):
        model_io.encode_images([_png_header(7000, 7000)])  # the header alone claims 49 M pixels
    with pytest.raises(ValueError, match="image 0 is too large to decode safely: "):
        model_io.encode_images([_png_header(100_000, 100_000)])  # past Pillow's own bomb limit
    with pytest.raises(ValueError, match="image 0 (has zero size|is not a PNG/JPEG)"):
        model_io.encode_images([_png_header(0, 7)])
    small_limit = load_io(ModelConfig("tiny-vit", "vit", 32, 1, 4, 64, image_size=32, patch_size=4), tmp_path,
                          max_pixels=1000)
    with pytest.raises(ValueError, match="image 0 is 61x45 = 2745 pixels; the limit is 1000 pixels"):
        small_limit.encode_images([good])


def test_preprocessor_config_value_errors(tmp_path):
    config = ModelConfig("tiny-vit", "vit", 32, 1, 4, 64, image_size=32, patch_size=4)
    with pytest.raises(ValueError, match="makes 32x24 images; tiny-vit takes square images whose side is a "
                                         "multiple of 4"):
        load_io(config, _folder(tmp_path, {**VIT_PREPROCESSOR, "size": {"height": 32, "width": 24}}))
    with pytest.raises(ValueError, match="makes 30x30 images; tiny-vit takes square images whose side is a "
                                         "multiple of 4"):
        load_io(config, _folder(tmp_path, {**DINOV2_PREPROCESSOR, "crop_size": {"height": 30, "width": 30}}))
    with pytest.raises(ValueError, match="size depends on the input \\(shortest edge 32, no crop\\)"):
        load_io(config, _folder(tmp_path, {**DINOV2_PREPROCESSOR, "do_center_crop": False}))
    with pytest.raises(ValueError, match="has size \\{'longest_edge': 64\\}"):
        load_io(config, _folder(tmp_path, {**VIT_PREPROCESSOR, "size": {"longest_edge": 64}}))
    with pytest.raises(ValueError, match="asks for \\['do_pad'\\]"):
        load_io(config, _folder(tmp_path, {**VIT_PREPROCESSOR, "do_pad": True}))
    with pytest.raises(ValueError, match="the model takes 3 channels"):
        ImagePreprocessor.from_config({**VIT_PREPROCESSOR, "image_mean": [0.5, 0.5]})
    with pytest.raises(ValueError, match="images come out in 2 sizes"):
        ImagePreprocessor.from_config({**VIT_PREPROCESSOR, "do_resize": False}).batch(list(_images().values())[:2])
    model_io = load_io(get_config("dinov2-tiny-test"), None)
    with pytest.raises(ValueError, match="dinov2-tiny-test is an image-encoder; encode_texts needs a text model"):
        model_io.encode_texts(["a cat"])


def _save_hf(model, folder, preprocessor):
    model.eval().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_transformers_classification_head(tmp_path, family):
    torch.manual_seed(0)
    labels = {0: "cat", 1: "dog", 2: "eel", 3: "fox"}
    if family == "vit":
        hf = transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8, id2label=labels, label2id={v: k for k, v in labels.items()}))
        folder = _save_hf(hf, tmp_path, VIT_PREPROCESSOR)
    else:
        hf = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=28, patch_size=7,
            id2label=labels, label2id={v: k for k, v in labels.items()}))
        folder = _save_hf(hf, tmp_path, DINOV2_PREPROCESSOR)
    config = config_from_hf(json.loads((folder / "config.json").read_text()), f"tiny-{family}")
    # ViTForImageClassification has no pooler; config_from_hf assumes ViTModel's (dense + tanh) one.
    config = dataclasses.replace(config, pooler="cls")
    model_io = load_io(config, folder)
    assert model_io.classifier is not None and model_io.classifier.labels == ("cat", "dog", "eel", "fox")
    inputs = model_io.encode_images(list(_images().values())[:3])
    with torch.no_grad():
        outputs = load_checkpoint(build_model(config, seed=None), folder)(inputs)
        outputs.pop("hidden")  # the distributed runtime may not return it: the head must not need it
        probs = hf(pixel_values=inputs["pixel_values"]).logits.softmax(-1)
    answers = model_io.classify(outputs, inputs, top_k=2)
    for row, answer in enumerate(answers):
        best = probs[row].topk(2)
        assert [label for label, _ in answer] == [labels[int(i)] for i in best.indices]
        assert [score for _, score in answer] == pytest.approx(best.values.tolist(), abs=1e-5)
    torch.testing.assert_close(model_io.embeddings(outputs, inputs), outputs["cls"])
