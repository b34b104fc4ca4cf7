"""The calibrated codec (`tc:<digest>`, compress/calibrated.py): determinism, orthogonality, round-trip error,
that it beats the seeded random rotation on outlier-heavy activations, its state file, the real distributed
path, and that a measured row makes it a planner candidate under the default 1 % budget."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from edgeprism import assets
from edgeprism.assets.datasets import text_passages
from edgeprism.compress import get_codec, pack, request_nbytes, spec_nbytes, unpack
from edgeprism.compress.calibrated import TransformCodec, fit_codec, fit_layer, gaussian_levels, packed_code_bytes
from edgeprism.compress.calibrated_state import calibration_dir, load_calibrated, save
from edgeprism.compress.lowbit import LLOYD_MAX_GAUSSIAN
from edgeprism.evaluate.calibrated import calibrate_codec, code_bytes_for_ratio, exchanged_vectors, layer_budgets
from edgeprism.evaluate.eval_sets import _pad_batches
from edgeprism.evaluate.fidelity import fp32_exchange_bytes, run_distributed
from edgeprism.models.loading import build_model, load_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.partition.ranges import equal_shares, split_tokens
from edgeprism.plan import Limits, LinkEstimate, Request, choose_plan
from edgeprism.plan.planner import codec_exclusion
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.profile.fidelity import codec_entries


def _activations(n: int, d: int = 64, seed: int = 0) -> torch.Tensor:
    """Outlier-heavy residual-stream-like vectors: anisotropic, two channels ~15x the rest, heavy-tailed."""
    mixing = torch.randn(d, d, generator=torch.Generator().manual_seed(0)) * torch.logspace(0, -1.5, d)  # one source
    gen = torch.Generator().manual_seed(seed)  # the draw of its vectors
    x = torch.randn(n, d, generator=gen) @ mixing.T
    x = x * (1 - 0.5 * torch.rand(n, 1, generator=gen).log())  # token norms vary (1 + exponential)
    x[:, 3] += 15.0
    x[:, 40] -= 9.0 + torch.randn(n, generator=gen)
    return x


def _rel_error(decoded: torch.Tensor, x: torch.Tensor) -> float:
    return float(((decoded - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean())


def test_gaussian_levels_reproduce_max_1960():
    for bits, half in LLOYD_MAX_GAUSSIAN.items():
        levels, _ = gaussian_levels(bits)
        assert levels[len(levels) // 2:] == pytest.approx(half, abs=2e-4)
    mse = [gaussian_levels(b)[1] for b in range(1, 9)]
    assert mse[0] == pytest.approx(0.3634, abs=1e-4) and all(a > b for a, b in zip(mse, mse[1:]))


def test_same_calibration_same_codec_same_bytes():
    samples = [_activations(3000, seed=1), _activations(3000, seed=2)]
    first, second = fit_codec(samples, 30, outliers=2), fit_codec([s.clone() for s in samples], 30, outliers=2)
    assert first.name == second.name and first == second and first.name.startswith("tc:")
    hidden = _activations(14, seed=5).view(2, 7, 64)
    valid = torch.ones(2, 7, dtype=torch.bool)
    assert all(torch.equal(a, b) for a, b in zip(first.encode(hidden, valid), second.encode(hidden, valid)))
    other = fit_codec([samples[0][:2000], samples[1]], 30, outliers=2)
    assert other.name != first.name  # another calibration split is another codec, by name


def test_basis_is_orthogonal_and_bits_fit_the_budget():
    layer = fit_layer(_activations(4000), code_bytes=28, outliers=1)
    eye = torch.eye(64)
    assert torch.allclose(layer.basis.T @ layer.basis, eye, atol=1e-5)
    assert torch.allclose(layer.basis @ layer.basis.T, eye, atol=1e-5)
    assert packed_code_bytes(layer.bits) <= 28 - 4
    assert max(layer.bits) <= 8 and layer.bits[0] >= layer.bits[-1]  # more bits where the variance is


@pytest.mark.parametrize("size", [(1, 1), (2, 13), (3, 16)])
def test_wire_matches_spec_and_round_trip_error_is_bounded(size):
    batch, n = size
    codec = fit_codec([_activations(4000, seed=3)], code_bytes=64 * 8 // 8 * 4)  # 4 bits per value on average
    hidden = _activations(batch * n, seed=9).view(batch, n, 64)
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[-1, n // 2 + 1:] = False
    wire = codec.encode(hidden, valid)
    spec = codec.wire_spec(batch, n, 64)
    assert [(tuple(t.shape), t.dtype) for t in wire] == [(tuple(s), dt) for s, dt in spec]
    assert codec.nbytes(batch, n, 64) == spec_nbytes(spec) == pack(wire).numel()
    vectors, counts = codec.decode(unpack(pack(wire), spec))
    assert torch.equal(counts, valid.float())
    real = valid.unsqueeze(-1).expand_as(hidden)
    # 4 bits: Lloyd-Max error 0.0095 of the variance per value; heavy tails and a 1-vector sample: 5x margin
    assert _rel_error(vectors[real].view(-1, 64), hidden[real].view(-1, 64)) < 0.05
    assert torch.all(vectors[~real] == 0)
    exact = fit_codec([_activations(4000, seed=3)], code_bytes=64)  # 8 bits everywhere
    assert _rel_error(exact.decode(exact.encode(hidden, valid))[0][real].view(-1, 64),
                      hidden[real].view(-1, 64)) < 2e-4


def test_calibrated_beats_the_random_rotation_at_fewer_bytes():
    train, test = _activations(6000, seed=11), _activations(500, seed=12).unsqueeze(0)
    valid = torch.ones(test.shape[:2], dtype=torch.bool)
    rotated = get_codec("lb4o4r")
    budget = rotated.nbytes(1, 500, 64) // 500 - 3  # per vector, less than lb4o4r pays
    calibrated = fit_codec([train], budget, outliers=1)
    assert calibrated.nbytes(1, 500, 64) < rotated.nbytes(1, 500, 64)
    mine, theirs = (_rel_error(c.decode(c.encode(test, valid))[0], test) for c in (calibrated, rotated))
    assert mine < 0.5 * theirs, (mine, theirs)


def test_state_file_round_trip_by_name_and_tamper_check(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPRISM_HOME", str(tmp_path))
    codec = fit_codec([_activations(2000), _activations(2000, seed=4)], 24, delta=True, description="test")
    path = save(codec)
    assert path.parent == tmp_path / "codecs" == calibration_dir() == assets.cache_dir() / "codecs"  # one home
    loaded = get_codec(codec.name)
    assert isinstance(loaded, TransformCodec) and loaded == codec and loaded.delta and loaded.description == "test"
    assert all(torch.equal(a.basis, b.basis) and a.levels[0].equal(b.levels[0])
               for a, b in zip(loaded.layers, codec.layers))
    with pytest.raises(ValueError, match="calibration files"):
        load_calibrated("tc:000000000000", tmp_path / "codecs")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors["0.mean"] = tensors["0.mean"] + 1
    save_file(tensors, str(path), metadata={"layers": "2", "delta": "1"})
    with pytest.raises(ValueError, match="hashes to"):
        load_calibrated(path)


def test_calibrated_on_the_real_distributed_path_and_planned_under_the_budget(tmp_path, monkeypatch):
    model = build_model("bert-tiny-test", seed=3)
    calibration = [synthetic_inputs(model.config, 2, seq_len=24, padded=True, seed=s) for s in range(6)]
    vectors = exchanged_vectors(model, calibration, 2)
    assert len(vectors) == model.config.num_layers and vectors[0].shape[1] == model.config.exchange_width
    assert len({v.shape[0] for v in vectors}) == 1  # the same tokens at every layer (delta fits need it)
    codec = calibrate_codec(model, calibration, 2, ratio=4.0)
    assert codec.delta and len(codec.layers) == model.config.num_layers
    batches = [synthetic_inputs(model.config, 2, seq_len=20, padded=True, seed=50 + s) for s in range(2)]
    with torch.no_grad():
        reference = [model(b)["mean"] for b in batches]
    outputs, nbytes = run_distributed(model, batches, codec, 2)
    cosine = torch.cat([torch.nn.functional.cosine_similarity(r, o["mean"], dim=-1)
                        for r, o in zip(reference, outputs)])
    assert float(cosine.min()) > 0.999
    # the bytes the transport counted are the codec's own per-layer counts (each rank sends its 10 tokens)
    per_rank = request_nbytes(codec, model.config.num_layers, 2, 10, model.config.exchange_width)
    assert nbytes == 2 * 2 * per_rank
    # a measured row imports into the profile's codec entry, and the planner may pick it under the 1 % budget
    # (the profile names the codec: its state file must be where every rank looks, calibration_dir())
    monkeypatch.setenv("EDGEPRISM_HOME", str(tmp_path))
    save(codec)
    row = {"codec": codec.name, "metric": "pooled_cosine", "value": float(cosine.mean()), "reference_value": 1.0}
    fp32, entry = codec_entries([get_codec("fp32"), codec], model.config.exchange_width, {codec.name: row},
                                num_layers=model.config.num_layers)
    assert entry.fidelity_loss is not None and entry.fidelity_loss < 0.01
    assert entry.wire_bytes_per_token < fp32.wire_bytes_per_token / 3
    assert codec_exclusion(entry, Limits()) is None  # the default budget admits it
    # slow devices on a slow link: splitting pays, and the calibrated codec's few bytes win over fp32
    profile = synthetic_profile("bert-tiny-test", bandwidth_bps=2e6, codecs=[fp32, entry], seconds_per_image=500.0)
    plan = choose_plan(profile, Request("bert-tiny-test", 8, 256), LinkEstimate(2e6, 1e-3))
    assert plan.mode != "local" and plan.codec == codec.name, plan
    assert plan.fidelity_loss == pytest.approx(entry.fidelity_loss)


def test_layer_budgets_follow_sensitivity_and_keep_the_mean():
    budgets = layer_budgets([1e-5, 4e-5, 4e-5, 1.6e-4], 100, 384)
    assert sum(budgets) <= 400 and budgets[0] < budgets[1] == budgets[2] < budgets[3]
    assert budgets[3] - budgets[1] == pytest.approx(2 * 384 / 16, abs=1)  # d/16 bytes per doubling
    assert code_bytes_for_ratio(384, 8.0) == 189
    assert dataclasses.is_dataclass(TransformCodec)


def _real_minilm():
    """(real MiniLM-L6, its tokenizer at 256 tokens); the test is skipped without `make assets`."""
    try:
        checkpoint, tokenizer = assets.minilm_checkpoint_dir(), assets.minilm_tokenizer(max_length=256)
    except assets.AssetMissingError as err:
        pytest.skip(f"MiniLM assets not prepared (make assets): {err}")
    return load_model("minilm-l6", checkpoint), tokenizer


def test_real_minilm_calibrated_codec_is_faithful_at_8x():
    """Real MiniLM-L6 (skipped without `make assets`): calibrated on 4 passages, checked on 4 others."""
    model, tokenizer = _real_minilm()
    passages = text_passages(tokenizer, 128, 256, limit=204)
    batches = {name: _pad_batches([e.ids for e in tokenizer.encode_batch(texts)], 1)
               for name, texts in (("calibration", passages[200:204]), ("check", passages[:4]))}
    codec = calibrate_codec(model, batches["calibration"], 2)
    outputs, nbytes = run_distributed(model, batches["check"], codec, 2)
    with torch.no_grad():
        reference = torch.cat([model(b)["mean"] for b in batches["check"]])
    cosine = torch.nn.functional.cosine_similarity(reference, torch.cat([o["mean"] for o in outputs]), dim=-1)
    assert fp32_exchange_bytes(model, batches["check"], 2) / nbytes >= 8.0
    assert float(cosine.min()) > 0.999, cosine


def test_fit_in_a_metric_is_deterministic_saved_and_cuts_the_error_that_metric_counts(tmp_path):
    """A fit against what a (d, 2d) projection W makes of the error (e^T W W^T e, as `kv_metric` gives for K/V):
    same vectors, same codec; the state file keeps the decoder's matrix; that error is lower than the plain
    fit's at the same bytes, while the plain fit keeps the lower squared error of the vector itself."""
    train, test = _activations(3000, seed=21), _activations(800, seed=22).unsqueeze(0)
    valid = torch.ones(test.shape[:2], dtype=torch.bool)
    projection = torch.randn(64, 128, generator=torch.Generator().manual_seed(7)) * torch.logspace(1, -1, 64)[:, None]
    metric = projection @ projection.T
    codecs = [fit_codec([train], 28, metrics=[metric]) for _ in range(2)]
    assert codecs[0] == codecs[1] and codecs[0].layers[0].inverse is not None
    assert all(torch.equal(a, b) for a, b in zip(codecs[0].encode(test, valid), codecs[1].encode(test, valid)))
    assert load_calibrated(save(codecs[0], tmp_path)) == codecs[0]  # the hash covers the decoder's matrix
    plain = fit_codec([train], 28)
    assert plain.name != codecs[0].name and plain.nbytes(1, 800, 64) == codecs[0].nbytes(1, 800, 64)
    errors = {name: c.decode(c.encode(test, valid))[0][0] - test[0]
              for name, c in (("kv", codecs[0]), ("plain", plain))}
    kv_error = {name: float((e @ projection).pow(2).sum()) for name, e in errors.items()}
    assert kv_error["kv"] < 0.7 * kv_error["plain"], kv_error
    assert float(errors["plain"].pow(2).sum()) < float(errors["kv"].pow(2).sum())


def test_recorded_vectors_are_in_batch_then_rank_order_whatever_order_the_ranks_start_in():
    """The ranks' threads make their sessions in any order; the calibration vectors (and so the codec's digest)
    must not depend on it: batch by batch, rank 0's tokens first (layer 0 of a post-LN model: the embeddings)."""
    model = build_model("bert-tiny-test", seed=3)
    batches = [synthetic_inputs(model.config, 2, seq_len=9, seed=s) for s in (1, 2)]
    [first, *_] = exchanged_vectors(model, batches, 2)
    expected = []
    for batch in batches:
        with torch.no_grad():
            embedded = model.embed(batch, 0, 9)  # (2, 9, d)
        for part in split_tokens(9, equal_shares(2)):
            expected.append(embedded[:, part.start:part.end].reshape(-1, embedded.shape[-1]))
    assert torch.allclose(first, torch.cat(expected), atol=1e-6)


class _WordTokenizer:
    """Whitespace words + [CLS]/[SEP], with the `encode_batch` of a `tokenizers.Tokenizer` (a test input)."""

    def encode_batch(self, texts):
        return [dataclasses.make_dataclass("Encoding", ["ids"])(ids=[0] * (len(t.split()) + 2)) for t in texts]


def test_calibration_texts_follow_each_passage_with_its_own_short_sentences():
    from edgeprism.evaluate.calibration_text import SHORT_PER_PASSAGE, calibration_texts, short_sentences

    words = lambda n, w: " ".join([w] * n)
    passage = "\n".join(f"{words(k, f's{k}')}." for k in range(1, 31))  # sentences of 1..30 words
    tokenizer = _WordTokenizer()
    short = short_sentences(passage, tokenizer)
    lengths = [len(s.split()) + 2 for s in short]
    assert len(short) == SHORT_PER_PASSAGE and all(6 <= n <= 24 for n in lengths)
    assert lengths == sorted(lengths) and lengths[0] == 6 and len(set(lengths)) == SHORT_PER_PASSAGE  # strided
    assert all(s in " ".join(passage.split()) for s in short)  # the passage's own text, nothing else
    texts = calibration_texts([passage, "tiny. two words"], tokenizer)
    assert texts == [passage, *short, "tiny. two words"]  # no sentence of 6-24 tokens in the second
    assert calibration_texts([passage], tokenizer, per_passage=0) == [passage]  # the rule before
    assert calibration_texts([passage], tokenizer) == texts[:SHORT_PER_PASSAGE + 1]  # deterministic
    with pytest.raises(ValueError, match=r"\(9, 3\)"):
        short_sentences(passage, tokenizer, tokens=(9, 3))
    extra = [f"extra {i}" for i in range(5)]  # passage k of n gets extra[k*E/n : (k+1)*E/n]
    mixed = calibration_texts(["a b. c", "d e. f"], tokenizer, extra=extra)
    assert mixed == ["a b. c", "extra 0", "extra 1", "d e. f", "extra 2", "extra 3", "extra 4"]


def test_everyday_sentences_are_split_and_in_no_evaluated_set():
    from pathlib import Path

    from edgeprism.evaluate.calibration_text import everyday_sentences

    calibration, dev = everyday_sentences("calibration"), everyday_sentences("dev")
    assert len(calibration) >= 100 and len(dev) >= 100 and not set(calibration) & set(dev)
    heldout = (Path(__file__).parent / "fixtures" / "heldout_licenses.txt").read_text()
    assert not any(s in heldout for s in calibration + dev)
    try:
        queries = set(assets.intent_queries_path().read_text().splitlines())
    except assets.AssetMissingError:
        queries = set()
    assert not queries & set(calibration + dev)
    with pytest.raises(ValueError, match="'test'"):
        everyday_sentences("test")  # type: ignore[arg-type]


@pytest.mark.slow
def test_real_minilm_short_sentences_in_the_calibration_cut_the_error_on_short_requests():
    """Real MiniLM-L6 (skipped without `make assets`): calibrated on 4 pool passages with and without their short
    sentences (`calibration_texts`), checked on short sentences of 4 other pool passages (none evaluated)."""
    from edgeprism.evaluate.calibration_text import calibration_texts, short_sentences

    model, tokenizer = _real_minilm()
    passages = text_passages(tokenizer, 128, 256, limit=208)
    encode = lambda texts: [_pad_batches([e.ids], 1)[0] for e in tokenizer.encode_batch(texts)]
    check = encode([s for p in passages[204:208] for s in short_sentences(p, tokenizer)])
    with torch.no_grad():
        reference = torch.cat([model(b)["mean"] for b in check])
    error = {}
    for per_passage in (0, 5):
        codec = calibrate_codec(model, encode(calibration_texts(passages[200:204], tokenizer, per_passage)), 2)
        outputs, _ = run_distributed(model, check, codec, 2)
        cosine = torch.nn.functional.cosine_similarity(reference, torch.cat([o["mean"] for o in outputs]), dim=-1)
        error[per_passage] = float(1 - cosine.mean())
    assert error[5] < 0.8 * error[0], error
