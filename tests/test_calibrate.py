"""Compression-aware calibration: the emulation is the distributed transform, gradients pass the codec,
calibration lowers the codec-in-the-loop loss, checkpoints round-trip, the CLI refuses bad input."""

from __future__ import annotations

import json

import pytest
import torch

from edgeprism.calibrate.checkpoint import save_checkpoint
from edgeprism.calibrate.emulate import codec_roundtrip, emulate
from edgeprism.calibrate.train import CalibrationSettings, calibrate, codec_loss, trainable_parameters
from edgeprism.cli.main import main
from edgeprism.compress.registry import get_codec
from edgeprism.evaluate.fidelity import run_distributed
from edgeprism.models.loading import build_model, load_checkpoint
from edgeprism.models.synthetic import synthetic_inputs

MODELS = {"vit-tiny-test": {}, "bert-tiny-test": {"seq_len": 29, "padded": True},
          "gpt2-tiny-test": {"seq_len": 29}, "llama-tiny": {"seq_len": 29}}


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("codec_name", ["sm4", "sm4a", "int8"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_emulation_equals_distributed_position_wise(model_name, codec_name, world_size):
    """The single-process emulation gives what PositionWise gives over the loopback transport."""
    model = build_model(model_name, seed=3)
    inputs = synthetic_inputs(model.config, 2, seed=1, **MODELS[model_name])
    codec = get_codec(codec_name)
    (distributed,), _ = run_distributed(model, [inputs], codec, world_size, gather_hidden=True)
    with torch.no_grad():
        emulated = emulate(model, inputs, codec, world_size)
        local = model(inputs)
    assert set(emulated) == set(distributed)
    for key in distributed:
        torch.testing.assert_close(emulated[key], distributed[key], atol=1e-5, rtol=0)
    # not vacuous: the codec changes the output
    assert float((emulated["hidden"] - local["hidden"]).abs().max()) > 1e-4  # 10x the tolerance


def test_emulation_with_autograd_on_matches_distributed():
    """With gradients on, the straight-through path keeps the codec's forward value (uneven shares too)."""
    model = build_model("gpt2-tiny-test", seed=5).requires_grad_(True)
    inputs = synthetic_inputs(model.config, 2, seq_len=30, seed=2)
    codec, shares = get_codec("sm4+int8"), (0.5, 0.3, 0.2)
    (distributed,), _ = run_distributed(model, [inputs], codec, 3, shares=shares, gather_hidden=True)
    emulated = emulate(model, inputs, codec, 3, shares=shares)
    assert emulated["hidden"].requires_grad
    torch.testing.assert_close(emulated["hidden"].detach(), distributed["hidden"], atol=1e-5, rtol=0)


def test_gradient_of_segment_means_is_the_mean_weight():
    hidden = torch.randn(1, 8, 4, requires_grad=True)
    valid = torch.ones(1, 8, dtype=torch.bool)
    valid[0, 7] = False  # padding: no gradient, and the last segment averages 3 tokens
    vectors, counts = codec_roundtrip(get_codec("sm4"), hidden, valid, None)
    assert counts.tolist() == [[4.0, 3.0]]
    vectors.sum().backward()
    expected = torch.tensor([0.25] * 4 + [1 / 3] * 3 + [0.0])
    torch.testing.assert_close(hidden.grad[0, :, 0], expected)


def test_straight_through_estimator_for_quantising_codecs():
    codec = get_codec("int8")
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    valid = torch.ones(2, 5, dtype=torch.bool)
    vectors, _ = codec_roundtrip(codec, hidden, valid, None)
    decoded, _ = codec.decode(codec.encode(hidden.detach(), valid))
    torch.testing.assert_close(vectors.detach(), decoded, atol=1e-6, rtol=0)  # forward: the codec's value
    assert not torch.equal(decoded, hidden.detach())
    vectors.sum().backward()
    torch.testing.assert_close(hidden.grad, torch.ones_like(hidden))  # backward: identity


def test_gradient_reaches_earlier_ranks_only_through_the_exchange():
    """A loss on the last rank's tokens moves the position embeddings of rank 0's tokens (through the means),
    and a decoder's rank 0 gets no gradient from later ranks' positions."""
    model = build_model("gpt2-tiny-test", seed=1).requires_grad_(True)
    inputs = synthetic_inputs(model.config, 1, seq_len=16, seed=0)
    out = emulate(model, inputs, get_codec("sm4"), 2)
    out["hidden"][:, 8:].sum().backward()
    grad = model.wpe.weight.grad
    assert float(grad[:8].abs().sum()) > 0  # rank 0's positions, reached through Segment Means
    model.zero_grad()
    out = emulate(model, inputs, get_codec("sm4"), 2)
    out["hidden"][:, :8].sum().backward()
    assert float(model.wpe.weight.grad[8:16].abs().sum()) == 0  # causal: nothing flows back from rank 1


class CopyTask:
    """Synthetic: the second half of each row repeats the first, so predicting it needs the other rank."""

    name = "copy"
    head = None

    def batch(self, batch_size, generator):
        first = torch.randint(1, 20, (batch_size, 12), generator=generator)
        ids = torch.cat([first, first], dim=1)  # (B, 24)
        return {"input_ids": ids[:, :-1]}, ids[:, 1:].reshape(-1)

    def logits(self, model, outputs, head):
        logits = model.logits(outputs["hidden"])
        return logits.reshape(-1, logits.shape[-1])


@pytest.mark.parametrize("params", ["full", "light"])
def test_a_few_calibration_steps_lower_the_codec_in_the_loop_loss(params):
    torch.manual_seed(0)
    model, task = build_model("gpt2-tiny-test", seed=2), CopyTask()
    settings = CalibrationSettings("sm4+int8", 2, steps=12, params=params, lr=3e-3, batch_size=8, distill=0.5)
    inputs, targets = task.batch(16, torch.Generator().manual_seed(99))  # fixed evaluation batch
    with torch.no_grad():
        before = float(codec_loss(model, task, inputs, targets, settings))
    calibrated, _, result = calibrate(model, task, settings)
    with torch.no_grad():
        after = float(codec_loss(calibrated, task, inputs, targets, settings))
    assert after < before - 0.05, (before, after)
    assert len(result.losses) == 12 and result.num_trainable <= result.num_parameters
    assert not any(p.requires_grad for p in model.parameters())  # the original is untouched
    if params == "light":
        assert result.num_trainable < 0.1 * result.num_parameters


def test_light_parameter_set_is_norms_and_biases():
    model = build_model("vit-tiny-test", seed=0)
    chosen = {id(p) for p in trainable_parameters({"model": model}, "light")}
    names = {n for n, p in model.named_parameters() if id(p) in chosen}
    assert "blocks.0.norm1.weight" in names and "blocks.1.attn.key.bias" in names and "norm.bias" in names
    assert not any(n.endswith(".weight") and "norm" not in n for n in names)
    assert "cls_token" not in names and "position_embeddings" not in names


@pytest.mark.parametrize("model_name", ["gpt2-tiny-test", "vit-tiny-test", "bert-tiny-test", "dinov2-tiny-test",
                                        "vit-fmnist-tiny"])
def test_checkpoint_round_trips_through_load_checkpoint(model_name, tmp_path):
    model = build_model(model_name, seed=4)
    save_checkpoint(model, tmp_path, {"note": "test"})
    loaded = load_checkpoint(build_model(model_name, seed=9), tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert json.loads((tmp_path / "config.json").read_text())["note"] == "test"


@pytest.mark.parametrize("argv, message", [
    (["--model", "minilm-l6", "--codec", "sm4"], "no calibration data"),
    (["--model", "no-such-model", "--codec", "sm4"], "unknown model"),
    (["--model", "gpt2-shakespeare", "--codec", "sm0"], "must be >= 1"),
    (["--model", "gpt2-shakespeare", "--codec", "zip9"], "unknown codec"),
    (["--model", "gpt2-shakespeare", "--codec", "sm4", "--steps", "0"], "--steps 0"),
    (["--model", "gpt2-shakespeare", "--codec", "sm4", "--world-size", "1"], "at least 2 ranks"),
])
def test_cli_bad_input_exits_2_with_a_message(argv, message, tmp_path, capsys):
    assert main(["calibrate", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_calibrates_gpt2_and_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "calibrated"
    code = main(["calibrate", "--model", "gpt2-shakespeare", "--codec", "sm16", "--world-size", "2", "--steps", "2",
                 "--batch-size", "1", "--eval-limit", "1", "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    variants = {(r["variant"], r["codec"]) for r in summary["rows"]}
    assert variants == {(v, c) for v in ("as-shipped", "calibrated") for c in ("fp32", "sm16")}
    assert {r["metric"] for r in summary["rows"]} == {"perplexity", "next_token_agreement", "label_shift"}
    assert all(r["value"] > 1 for r in summary["rows"] if r["metric"] == "perplexity")
    assert summary["result"]["settings"]["steps"] == 2
    model = load_checkpoint(build_model("gpt2-shakespeare", seed=None), out)
    assert json.loads((out / "CALIBRATION.json").read_text())["model"] == "gpt2-shakespeare"
    assert model.config.name == "gpt2-shakespeare"


@pytest.mark.slow
def test_calibration_recovers_held_out_perplexity_under_sm16():
    """gpt2-shakespeare, 4 ranks, sm16: 60 steps of codec-in-the-loop fine-tuning lower held-out perplexity
    through the real distributed path (a few minutes on CPU)."""
    from edgeprism.calibrate.runner import run_calibration

    settings = CalibrationSettings("sm16", 4, steps=60, distill=1.0)
    summary = run_calibration("gpt2-shakespeare", settings, eval_codecs=["sm16"], eval_limit=16)
    value = {r["variant"]: r["value"] for r in summary["rows"]}
    assert value["calibrated"] < value["as-shipped"]


def test_eval_reads_a_calibrated_checkpoint(tmp_path):
    from edgeprism import assets
    from edgeprism.evaluate.eval_sets import eval_sets_for
    from edgeprism.models.loading import load_pretrained

    model = load_pretrained(assets.gpt2_shakespeare_dir(), "gpt2-shakespeare")
    with torch.no_grad():
        model.norm.weight.mul_(1.5)  # stands in for calibrated weights
    save_checkpoint(model, tmp_path / "calibrated")
    (eval_set,) = eval_sets_for("gpt2-shakespeare", 2, checkpoint=str(tmp_path / "calibrated"))
    assert torch.equal(eval_set.model.norm.weight, model.norm.weight)
    (shipped,) = eval_sets_for("gpt2-shakespeare", 2)
    assert not torch.equal(shipped.model.norm.weight, model.norm.weight)
    with pytest.raises(ValueError, match="synthetic smoke preset"):
        eval_sets_for("gpt2-tiny-test", 2, checkpoint=str(tmp_path / "calibrated"))
