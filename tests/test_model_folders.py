"""`--model` takes a user's own checkpoint folder (issue 15 item 1): the architecture from its config.json,
the weights from its safetensors. Each family's folder, written by transformers' `save_pretrained`, runs
`edgeprism run --model DIR --world-size 2 --compare-local` exactly (CR 1); an unsupported model_type is one
clear error before anything starts; a served folder admits a device holding the same folder (at another
path) and refuses one holding other weights."""

import json
import shutil
import signal
import time

import pytest
import torch

from devices import join, stop
from edgeprism.cli.main import main
from edgeprism.comm.auth import new_secret, write_secret_file
from edgeprism.compress.registry import get_codec
from edgeprism.evaluate.fidelity import run_distributed
from edgeprism.models.loading import folder_model_name, load_model, model_config, resolve_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile
from edgeprism.runtime import EngineConfig, launch_engine
from model_folders import BUILDERS, bert_folder, has_llama, roberta_folder, unsupported_folder, vit_folder

FAMILIES = ["vit", "bert", "gpt2", pytest.param("llama", marks=pytest.mark.skipif(
    not has_llama(), reason="no 'llama' family registered on this branch (models/llama.py comes with it)"))]


@pytest.mark.parametrize("family", FAMILIES)
def test_run_compare_local_on_a_saved_folder_is_exact(family, tmp_path, capsys):
    folder = BUILDERS[family](tmp_path / f"my-{family}")
    code = main(["run", "--model", str(folder), "--world-size", "2", "--compare-local", "--json", "--repeats", "1",
                 "--warmup", "0", "--timeout", "120"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["model"] == f"my-{family}" and result["world_size"] == 2
    assert result["max_abs_diff"] <= 1e-5, result["max_abs_diff_per_output"]


def test_folder_models_match_transformers_on_the_same_weights(tmp_path):
    """The folder's architecture is read right: our model equals transformers' own on its weights."""
    transformers = pytest.importorskip("transformers")
    vit = vit_folder(tmp_path / "vit-cls", num_labels=3)  # a task model: no pooler, [CLS] pooled
    ours = load_model(str(vit))
    assert ours.config.pooler == "cls" and model_config(str(vit)).config_hash() == ours.config.config_hash()
    theirs = transformers.ViTForImageClassification.from_pretrained(vit).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = ours({"pixel_values": pixels})["cls"], theirs.vit(pixel_values=pixels).last_hidden_state[:, 0]
    assert torch.allclose(got, want, atol=1e-5)
    bert = bert_folder(tmp_path / "bert")
    ours = load_model(str(bert))
    theirs = transformers.BertModel.from_pretrained(bert).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        want = theirs(input_ids=ids)
    assert torch.allclose(got["hidden"], want.last_hidden_state, atol=1e-5)
    assert torch.allclose(got["pooled"], want.pooler_output, atol=1e-5)
    roberta = roberta_folder(tmp_path / "roberta")  # positions from pad_token_id + 1; right-padded rows
    ours = load_model(str(roberta))
    assert (ours.config.position_offset, ours.config.max_positions) == (2, 64)
    theirs = transformers.RobertaModel.from_pretrained(roberta).eval()
    ids = torch.randint(3, 50, (2, 64), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 40:], ids[1, 40:] = 0, 1
    with torch.no_grad():
        got = ours({"input_ids": ids, "attention_mask": mask})
        want = theirs(input_ids=ids, attention_mask=mask)
    assert torch.allclose(got["hidden"][0], want.last_hidden_state[0], atol=1e-5)
    assert torch.allclose(got["hidden"][1, :40], want.last_hidden_state[1, :40], atol=1e-5)
    assert torch.allclose(got["pooled"], want.pooler_output, atol=1e-5)
    # and the split (3 ranks, uneven shares, padded rows) puts each rank's tokens at their offset positions
    split, _ = run_distributed(ours, [{"input_ids": ids, "attention_mask": mask}], get_codec("fp32"), 3,
                               (0.5, 0.2, 0.3), gather_hidden=True)
    assert torch.allclose(split[0]["pooled"], got["pooled"], atol=1e-5)
    assert torch.allclose(split[0]["hidden"][1, :40], got["hidden"][1, :40], atol=1e-5)


@pytest.mark.parametrize("model_type", ["mpnet", "t5"])
def test_an_unsupported_architecture_is_one_error_naming_it_and_the_families(model_type, tmp_path, capsys):
    folder = unsupported_folder(tmp_path / "theirs", model_type)
    with pytest.raises(ValueError) as err:
        resolve_model(str(folder))  # what every command runs first, before any worker starts
    for word in (repr(model_type), "bert", "gpt2", "vit", "dinov2"):
        assert word in str(err.value), str(err.value)
    assert main(["run", "--model", str(folder), "--world-size", "2"]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and model_type in message and "supported families" in message


def test_model_argument_mistakes_are_named(tmp_path):
    folder = vit_folder(tmp_path / "vit")
    other = vit_folder(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="drop --checkpoint"):
        resolve_model(str(folder), str(other))
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        resolve_model(str(tmp_path / "missing"))
    assert resolve_model("vit-tiny-test") == ("vit-tiny-test", None)  # presets stay names
    preset_named = vit_folder(tmp_path / "vit-tiny-test")
    assert folder_model_name(preset_named) == "vit-tiny-test.folder"  # a preset name always means the preset
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has none of model.safetensors"):
        resolve_model(str(folder))


CONFIG = EngineConfig(join_check_s=0.1, probe_every=0, group_timeout_s=10.0, learn_compute=False, learn_link=False,
                      learn_speeds=False)


def test_a_served_folder_admits_the_same_folder_and_refuses_other_weights(tmp_path):
    served = vit_folder(tmp_path / "served" / "my-vit", seed=0)
    copy = shutil.copytree(served, tmp_path / "device" / "my-vit")  # the same folder, elsewhere on the device
    other = vit_folder(tmp_path / "other" / "my-vit", seed=1)  # same architecture and name, other weights
    secret_file = write_secret_file(tmp_path / "secret", new_secret())
    config = model_config(str(served))
    profile = synthetic_profile(config, bandwidth_bps=1e9, latency_s=1e-4, seconds_per_image=3000,
                                codecs=synthetic_codecs(config.hidden_size)[:1])
    engine = launch_engine(2, str(served), profile, config=CONFIG, local_workers=False, bind_addr="127.0.0.1",
                           port=0, secret_file=secret_file)
    devices = []
    try:
        refused = join(engine.address, secret_file, "--no-retry", "--checkpoint", str(other))
        devices.append(refused)
        assert refused.wait(timeout=120) == 2
        assert "weights" in refused.stderr.read()
        devices.append(join(engine.address, secret_file, "--no-retry", "--checkpoint", str(copy)))
        deadline = time.monotonic() + 60
        while engine.cluster_status()["members"] != [0, 1] and time.monotonic() < deadline:
            time.sleep(0.1)  # the coordinator's ticker takes devices in between requests
        assert engine.cluster_status()["members"] == [0, 1]
        inputs = synthetic_inputs(config, 2, image_size=64, seed=3)  # 65 tokens: the plan takes both ranks
        result = engine.infer(inputs)
        assert result.metrics.mode == "distributed" and result.metrics.plan["ranks"] == [0, 1]
        with torch.no_grad():
            reference = engine.model(inputs)
        for key, value in result.outputs.items():
            assert torch.allclose(value, reference[key], atol=1e-5, rtol=0), key
    finally:
        engine.close()
        for proc in devices:
            stop(proc, signal.SIGKILL, 5.0)


def test_plan_profile_check_and_calibrate_take_a_folder(tmp_path, capsys):
    folder = vit_folder(tmp_path / "my-vit")
    assert main(["plan", "--synthetic", str(folder), "--batch", "2", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["profile"]["model"] == "my-vit"
    assert planned["profile"]["config_hash"] == model_config(str(folder)).config_hash()
    profile_path = tmp_path / "my-vit.profile.json"
    synthetic_profile(model_config(str(folder))).save(profile_path)
    assert main(["profile", "--model", str(folder), "--check", str(profile_path), "--world-size", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    other = vit_folder(tmp_path / "my-vit-wide" / "my-vit", seed=0)  # same name, another architecture
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    assert main(["profile", "--model", str(other), "--check", str(profile_path), "--world-size", "2"]) == 2
    assert "another my-vit architecture" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(folder), "--codec", "sm4", "--out", str(tmp_path / "out")]) == 2
    assert "eval --model DIR --data" in capsys.readouterr().err  # not a calibration preset's shape
