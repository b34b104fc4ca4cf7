"""`edgeprism eval --model DIR --data FILE.jsonl` (issue 15 item 5): each codec against the single device on
the user's own items, settings chosen on a calibration split, and rows the profile imports so the planner's
fidelity budget applies to that model."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from edgeprism.cli.main import main
from edgeprism.compress.registry import get_codec
from edgeprism.evaluate.settings import codec_variants
from edgeprism.evaluate.user_data import NEAR_TIE_MARGIN, read_items, split_items
from edgeprism.plan import Limits, codec_exclusion
from edgeprism.profile.fidelity import codec_entries, load_fidelity_rows, select_rows
from model_folders import WORDS, gpt2_folder, has_llama, llama_folder, vit_folder


def _texts(path, count, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            handle.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20)))}) + "\n")
    return path


def _images(folder, count, labelled=True):
    (folder / "img").mkdir(parents=True)
    lines = []
    for i in range(count):
        pixels = np.random.RandomState(i).randint(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "img" / f"{i}.png")
        lines.append({"image": f"img/{i}.png", **({"label": f"class{i % 3}"} if labelled else {})})
    path = folder / "images.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_decoder_rows_choose_settings_on_calibration_and_import_into_the_profile(tmp_path, capsys):
    folder = gpt2_folder(tmp_path / "my-gpt2")
    data, out = _texts(tmp_path / "text.jsonl", 8), tmp_path / "rows.jsonl"
    code = main(["eval", "--model", str(folder), "--data", str(data), "--codec", "fp32,lb2", "--calibration-fraction",
                 "0.25", "--out", str(out), "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    chosen = {r["codec"] for r in rows} - {"fp32"}
    assert len(chosen) == 1 and next(iter(chosen)) in codec_variants("lb2")
    assert {r["metric"] for r in rows} == {"next_token_agreement", "perplexity", "label_shift"}
    for row in rows:
        assert row["model"] == "my-gpt2" and row["split"] == "report" and row["num_requests"] == 6
        assert ("chosen_from" in row) == (row["codec"] != "fp32")
    exact = {r["metric"]: r for r in rows if r["codec"] == "fp32"}
    assert exact["next_token_agreement"]["value"] == 1.0 and exact["next_token_agreement"]["near_ties"] >= 0
    assert exact["perplexity"]["value"] == pytest.approx(exact["perplexity"]["reference_value"], rel=1e-5)
    assert 1 < exact["perplexity"]["reference_value"] < 257 * 4  # a random byte-level model: near uniform

    # what `edgeprism profile --fidelity FILE` does with them: a decoder's budget is on next-token agreement
    # (perplexity is reported, never budgeted on), and the budget applies
    lossy = next(iter(chosen))
    entries = {e.codec: e for e in codec_entries([get_codec("fp32"), get_codec(lossy)], 32,
                                                 select_rows(load_fidelity_rows(out), "my-gpt2", 2), num_layers=2)}
    agreement = next(r for r in rows if r["codec"] == lossy and r["metric"] == "next_token_agreement")
    assert entries["fp32"].loss == 0.0 and entries[lossy].metric == "next_token_agreement"
    assert entries[lossy].fidelity_loss == pytest.approx(1 - agreement["value"])
    assert codec_exclusion(entries["fp32"], Limits(max_fidelity_loss=0.0)) is None
    if agreement["loss"] > 0:
        assert codec_exclusion(entries[lossy], Limits(max_fidelity_loss=agreement["loss"] / 2)) is not None


def test_classifier_rows_count_near_ties_and_score_labels(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    folder = vit_folder(tmp_path / "my-vit", num_labels=3)  # ViTForImageClassification: its head is the classifier
    data = _images(tmp_path / "data", 6)
    assert main(["eval", "--model", str(folder), "--data", str(data), "--codec", "fp32,sm4", "--json"]) == 0
    rows = {(r["codec"], r["metric"]): r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(rows) == {(c, m) for c in ("fp32", "sm4") for m in ("pooled_cosine", "top1_agreement",
                                                                   "label_accuracy", "label_shift")}
    assert rows["fp32", "label_shift"]["value"] < 1e-5 < rows["sm4", "label_shift"]["value"]
    assert rows["fp32", "top1_agreement"]["value"] == 1.0
    assert rows["fp32", "pooled_cosine"]["value"] == pytest.approx(1.0, abs=1e-6)

    # the reference answers, computed independently by transformers on the same pixels
    from edgeprism.inputs.io import load_io
    from edgeprism.models.loading import load_model

    io = load_io(load_model(str(folder)).config, folder)
    pixels = io.encode_images([(tmp_path / "data" / "img" / f"{i}.png").read_bytes() for i in range(6)])["pixel_values"]
    with torch.no_grad():
        logits = transformers.ViTForImageClassification.from_pretrained(folder).eval()(pixel_values=pixels).logits
    top2 = logits.softmax(-1).topk(2, dim=-1).values
    labels = torch.tensor([i % 3 for i in range(6)])
    tie = rows["sm4", "top1_agreement"]
    assert tie["items"] == 6 and tie["near_ties"] == int((top2[:, 0] - top2[:, 1] < NEAR_TIE_MARGIN).sum())
    assert rows["sm4", "label_accuracy"]["reference_value"] == pytest.approx(
        float((logits.argmax(-1) == labels).float().mean()))


def test_codec_variants_vary_outliers_and_rotation_only():
    variants = codec_variants("lb3o4r")
    assert variants[0] == "lb3o4r" and {"lb3", "lb3r", "lb3o8", "lb3o2r"} <= set(variants)
    assert all(v.startswith("lb3") for v in variants) and len(variants) == len(set(variants)) == 8
    assert codec_variants("fp16") == ["fp16"] and codec_variants("sm4a+int8") == ["sm4a+int8"]
    delta = codec_variants("delta:lb4o4r:lb3o4r")
    assert "delta:lb4:lb3" in delta and "delta:lb4o8r:lb3o8r" in delta


def test_data_file_mistakes_are_named(tmp_path, capsys):
    texts = _texts(tmp_path / "text.jsonl", 3)
    with pytest.raises(ValueError, match="text.jsonl:1: the model takes images"):
        read_items(texts, "image")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a cat"}\n{"image": "missing.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_items(bad, "text")
    with pytest.raises(ValueError, match="leaves 0 for calibration"):
        split_items(read_items(texts, "text"), 0.1)
    assert [len(part) for part in split_items(read_items(texts, "text"), 0.34)] == [1, 2]
    folder = gpt2_folder(tmp_path / "gpt2")
    assert main(["eval", "--model", str(folder), "--calibration-fraction", "0.3", "--codec", "fp16"]) == 2
    assert "--data" in capsys.readouterr().err


@pytest.mark.skipif(not has_llama(), reason="no 'llama' family registered on this branch")
def test_inputs_of_a_llama_folder_follow_its_family_contract(tmp_path):
    """load_io asks the family's declared causality, so a Llama folder reads text as a decoder."""
    from edgeprism.inputs.io import load_io
    from edgeprism.models.loading import model_config

    folder = llama_folder(tmp_path / "my-llama")
    io = load_io(model_config(str(folder)), folder)
    assert io.task == "text-decoder" and io.encode_prompts(["a cat"]) == [list(b"a cat")]
