"""edgeprism.inputs on the real converted checkpoints in the cache (skipped where `make assets` has not run)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from edgeprism import assets
from edgeprism.inputs import load_io
from edgeprism.models.loading import config_from_hf, load_pretrained

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

SENTENCES = ["What's the weather going to be like tomorrow in Paris?", "please transfer $200 to my savings account",
             "play some jazz"]


def _folder(dirname: str, marker: str):
    folder = assets.cache_dir() / dirname
    if not (folder / marker).is_file():
        pytest.skip(f"{folder / marker} is missing: run `make assets` (prepare_assets rebuilds older folders)")
    return folder


def test_minilm_embeddings_and_intents():
    folder = _folder(assets.MINILM_DIRNAME, "modules.json")
    model = load_pretrained(folder, name="minilm-l6")
    model_io = load_io(model.config, folder)
    assert model_io.max_tokens == 256 and model_io.pooling.modes == ("mean",) and model_io.pooling.normalize
    inputs = model_io.encode_texts(SENTENCES)
    with torch.no_grad():
        outputs = model(inputs)
        hidden = transformers.BertModel.from_pretrained(folder).eval()(**inputs).last_hidden_state
    mask = inputs["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    embeddings = model_io.embeddings(outputs, inputs)
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=0)
    if model_io.classifier is None:
        pytest.skip("the MiniLM folder has no classifier (rag-intent-classifier was not installed at set-up)")
    answers = model_io.classify(outputs, inputs, top_k=3)
    head = assets.intent_head() if (assets.cache_dir() / assets.INTENT_HEAD_FILENAME).exists() else None
    for row, answer in enumerate(answers):
        assert len(answer) == 3 and 0 < answer[2][1] <= answer[1][1] <= answer[0][1] <= 1
        assert all(label in model_io.classifier.labels for label, _ in answer)
        if head is not None:
            assert answer[0][0] == head.predict(embeddings[row:row + 1])[0]
    assert answers[0][0][0] == "weather"


def test_dinov2_pixels_equal_transformers():
    folder = _folder(assets.DINOV2_DIRNAME, "preprocessor_config.json")
    Image = pytest.importorskip("PIL.Image")
    model_io = load_io(config_from_hf(json.loads((folder / "config.json").read_text()), "dinov2-s14"), folder)
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8)).save(buffer, format="PNG")
    pixels = model_io.encode_images([buffer.getvalue()])["pixel_values"]
    reference = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    theirs = reference(images=[Image.open(io.BytesIO(buffer.getvalue()))], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    torch.testing.assert_close(pixels, theirs, atol=1e-5, rtol=0)
