"""The bad-input catalogue: malformed requests, configs, checkpoints and profiles.

Each case asserts a clear error that names the problem; for requests, that the worker is still alive
and the next good request is served (so nothing hung). One engine (2 ranks, BERT) serves every request
case; the planner sends long requests over both ranks, so the workers are exercised in between.
"""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeprism.models.config import get_config
from edgeprism.models.loading import load_model
from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile
from edgeprism.profile.schema import Profile
from edgeprism.runtime import EngineConfig, launch_local
from edgeprism.runtime.requests import MAX_REQUEST_BYTES, load_request_json, parse_request
from edgeprism.runtime.serving import answer

BERT = get_config("bert-tiny-test")
GOOD = json.dumps({"id": "good", "synthetic": {"batch": 2, "seq_len": 96}})


@pytest.fixture(scope="module")
def engine():
    profile = synthetic_profile("bert-tiny-test", device_speeds=(1.0, 1.0), bandwidth_bps=1e9, latency_s=1e-4,
                                seconds_per_image=3000, codecs=synthetic_codecs(BERT.hidden_size)[:1])
    config = EngineConfig(max_batch=4, learn_compute=False, learn_link=False, learn_speeds=False)  # the profile plans
    with launch_local(2, "bert-tiny-test", profile, config=config) as engine:
        yield engine


def _ids(rows):
    return {"input_ids": rows}


REQUESTS = [
    # (name, request line, words the error must contain)
    ("not json", '{"id": "x", "model_input": ', "not valid JSON"),
    ("empty line of spaces", "   \t", "not valid JSON"),
    ("json array", "[1, 2, 3]", "JSON object"),
    ("json string", '"hello"', "JSON object"),
    ("json null", "null", "JSON object"),
    ("bad utf-8", b'{"id": "\xff\xfe"}', "not valid JSON"),
    ("deep nesting", "[" * 100000 + "]" * 100000, "nested too deeply"),
    ("unknown key", json.dumps({"id": "u", "synthetic": {}, "exec": "rm"}), "unknown keys ['exec']"),
    ("no input", json.dumps({"id": "n"}), "exactly one of"),
    ("two inputs", json.dumps({"id": "t", "synthetic": {}, "model_input": _ids([[1]])}), "exactly one of"),
    ("model_input not object", json.dumps({"id": "m", "model_input": [1, 2]}), "non-empty object"),
    ("empty model_input", json.dumps({"id": "e", "model_input": {}}), "non-empty object"),
    ("float token ids", json.dumps({"model_input": _ids([[1.5, 2.0]])}), "integers"),
    ("string token ids", json.dumps({"model_input": _ids([["a", "b"]])}), "input_ids"),
    ("bool token ids", json.dumps({"model_input": _ids([[True, False]])}), "input_ids"),
    ("null token ids", json.dumps({"model_input": _ids(None)}), "input_ids"),
    ("ragged rows", json.dumps({"model_input": _ids([[1, 2, 3], [4]])}), "ragged"),
    ("scalar input", json.dumps({"model_input": _ids(5)}), "input_ids"),
    ("token out of vocabulary", json.dumps({"model_input": _ids([[1, 99999]])}), "vocabulary"),
    ("negative token", json.dumps({"model_input": _ids([[1, -3]])}), "span [-3, 1]"),
    ("too many positions", json.dumps({"model_input": _ids([[1] * 500])}), "500"),
    ("batch over max", json.dumps({"synthetic": {"batch": 5, "seq_len": 8}}), "max batch 4"),
    ("zero batch", json.dumps({"synthetic": {"batch": 0}}), "between 1"),
    ("empty rows", json.dumps({"model_input": _ids([[]])}), "input_ids"),
    ("mask shape mismatch", json.dumps({"model_input": {"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1]]}}),
     "attention_mask"),
    ("mask not 0/1", json.dumps({"model_input": {"input_ids": [[1, 2]], "attention_mask": [[1, 7]]}}),
     "attention_mask"),
    ("pixels to a text model", json.dumps({"model_input": {"pixel_values": [[[[0.1]]]]}}), "input_ids"),
    ("nan pixels", '{"model_input": {"pixel_values": [[[[NaN]]]]}}', "NaN"),
    ("synthetic not object", json.dumps({"synthetic": 3}), "synthetic takes an object"),
    ("synthetic unknown key", json.dumps({"synthetic": {"batch": 1, "evil": 1}}), "synthetic takes an object"),
    ("synthetic string batch", json.dumps({"synthetic": {"batch": "2"}}), "synthetic.batch must be an integer"),
    ("synthetic image for text", json.dumps({"synthetic": {"image_size": 32}}), "image_size is for ViT"),
    ("synthetic zero length", json.dumps({"synthetic": {"seq_len": 0}}), "seq_len 0 must be >= 1"),
    ("unknown objective", json.dumps({"synthetic": {}, "objective": "speed"}), "objective must be one of"),
    ("fidelity budget string", json.dumps({"synthetic": {}, "max_fidelity_loss": "low"}), "must be a number"),
    ("fidelity budget out of range", json.dumps({"synthetic": {}, "max_fidelity_loss": 3}), "max_fidelity_loss"),
    ("negative latency limit", json.dumps({"synthetic": {}, "max_latency_s": -1}), "max_latency_s"),
    ("too large", b" " * (MAX_REQUEST_BYTES + 1), "exceeds"),
]


def test_catalogue_is_large_enough():
    assert len(REQUESTS) + len(FILES) + len(CONFIGS) >= 30


@pytest.mark.parametrize("name, line, words", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_bad_request_is_answered_with_a_clear_error_and_serving_goes_on(engine, name, line, words):
    reply = answer(engine, line, fallback_id="fallback")
    assert "error" in reply, reply
    assert words.lower() in reply["error"].lower(), reply["error"]
    assert engine.workers.failed() is None  # the worker is alive
    good = answer(engine, GOOD, fallback_id="good")
    assert "error" not in good and good["metrics"]["mode"] == "distributed", good
    assert not good["metrics"]["fallback"]


def test_bad_python_api_inputs(engine):
    for inputs, words in [({"input_ids": [[1, 2]]}, "not a torch.Tensor"), ({}, "non-empty dict"),
                          ({"input_ids": torch.tensor(3)}, "scalar"),
                          ({"input_ids": torch.ones(2, 4, dtype=torch.complex64)}, "complex"),
                          ({"input_ids": torch.ones(2, 4, dtype=torch.long),
                            "attention_mask": torch.ones(3, 4, dtype=torch.long)}, "disagree on the batch")]:
        with pytest.raises(ValueError, match=words):
            engine.infer(inputs)
    assert engine.infer(parse_request(json.loads(GOOD), BERT, 4).inputs).metrics.mode == "distributed"


# --- files: checkpoints and profiles ---
def _write(tmp_path, name, content):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _bert_config_json():
    return json.dumps({"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 128})


FILES = [
    ("checkpoint missing", "ckpt", None, "does not exist"),
    ("checkpoint without config", "ckpt", {}, "no config.json"),
    ("checkpoint config not json", "ckpt", {"config.json": "{oops"}, "not valid JSON"),
    ("checkpoint corrupt weights", "ckpt", {"config.json": _bert_config_json(), "model.safetensors": b"junk" * 9},
     "could not be read"),
    ("profile missing", "profile", None, "does not exist"),
    ("profile empty", "profile", "", "not valid JSON"),
    ("profile truncated", "profile", '{"schema_version": 1, ', "not valid JSON"),
    ("profile not an object", "profile", "[1, 2]", "JSON object"),
    ("profile future version", "profile", '{"schema_version": 999}', "schema_version 999"),
]


@pytest.mark.parametrize("name, kind, content, words", FILES, ids=[f[0] for f in FILES])
def test_bad_files_are_refused_before_anything_starts(tmp_path, name, kind, content, words):
    if kind == "ckpt":
        path = tmp_path / "ckpt"
        for file, text in (content or {}).items():
            _write(path, file, text)
        if content is not None:
            path.mkdir(exist_ok=True)
        with pytest.raises(ValueError, match=words):
            load_model("bert-tiny-test", str(path))
    else:
        path = tmp_path / "profile.json"
        if content is not None:
            _write(tmp_path, "profile.json", content)
        with pytest.raises(ValueError, match=words):
            Profile.load(path)


def test_profile_for_another_model_or_world_size_is_refused(tmp_path):
    path = tmp_path / "profile.json"
    synthetic_profile("vit-tiny-test", world_size=2).save(path)
    with pytest.raises(ValueError, match="vit-tiny-test"):
        launch_local(2, "bert-tiny-test", str(path))
    synthetic_profile("bert-tiny-test", world_size=3).save(path)
    with pytest.raises(ValueError, match="3"):
        launch_local(2, "bert-tiny-test", str(path))


CONFIGS = [
    (dict(max_batch=0), "max_batch 0"),
    (dict(blow_factor=0.5), "blow_factor"),
    (dict(probe_every=-1), "probe_every"),
    (dict(stall_factor=0.5), "stall_factor"),
    (dict(min_stall_s=0), "min_stall_s"),
    (dict(regroup_timeout_s=-1), "regroup_timeout_s"),
    (dict(group_timeout_s=0), "group_timeout_s"),
    (dict(max_fidelity_loss=2.0), "max_fidelity_loss"),
    (dict(max_latency_s=0), "max_latency_s"),
]


@pytest.mark.parametrize("fields, words", CONFIGS, ids=[w for _, w in CONFIGS])
def test_bad_engine_config_names_the_field(fields, words):
    with pytest.raises(ValueError, match=words):
        EngineConfig(**fields)


# --- fuzzing the parser: anything JSON gives a ParsedRequest or a ValueError, never another error ---
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30)
_keys = st.sampled_from(["id", "model_input", "synthetic", "objective", "max_fidelity_loss", "max_latency_s",
                         "input_ids", "attention_mask", "token_type_ids", "pixel_values", "batch", "seq_len"])
_tokens = st.lists(st.lists(st.integers(-5, 1200), min_size=0, max_size=6), min_size=0, max_size=3)
_request = st.dictionaries(_keys, _json | _tokens | st.dictionaries(_keys, _json | _tokens, max_size=4), max_size=5)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_request | _json)
def test_fuzz_parse_request(raw):
    try:
        parsed = parse_request(raw, BERT, max_batch=4, fallback_id="f")
    except ValueError:
        return
    for value in parsed.inputs.values():
        assert isinstance(value, torch.Tensor) and value.shape[0] <= 4
        if value.is_floating_point():
            assert bool(torch.isfinite(value).all())


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200) | st.text(max_size=200))
def test_fuzz_load_request_json(data):
    try:
        load_request_json(data)
    except ValueError as err:
        assert str(err)
