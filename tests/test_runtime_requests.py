"""Requests at the edge: every user mistake is a ValueError naming it; good requests become tensors."""

import json

import pytest
import torch

from edgeprism.models.config import get_config
from edgeprism.runtime.requests import MAX_REQUEST_BYTES, check_inputs, load_request_json, parse_request

BERT = get_config("bert-tiny-test")
VIT = get_config("vit-tiny-test")


def test_text_request_becomes_int64_tensors():
    parsed = parse_request({"id": "a", "model_input": {"input_ids": [[5, 6, 7]], "attention_mask": [[1, 1, 0]]},
                            "objective": "energy", "max_fidelity_loss": 0.02}, BERT, max_batch=4)
    assert parsed.request_id == "a" and parsed.objective == "energy"
    assert parsed.limits.max_fidelity_loss == 0.02
    assert parsed.inputs["input_ids"].dtype == torch.int64 and parsed.inputs["input_ids"].shape == (1, 3)


def test_top_level_pixels_and_synthetic():
    pixels = torch.rand(1, 3, 32, 32).tolist()
    parsed = parse_request({"id": 7, "pixel_values": pixels}, VIT, max_batch=4)
    assert parsed.request_id == "7" and parsed.inputs["pixel_values"].dtype == torch.float32
    parsed = parse_request({"synthetic": {"batch": 3, "seq_len": 16}}, BERT, max_batch=4, fallback_id="line1")
    assert parsed.request_id == "line1" and parsed.inputs["input_ids"].shape == (3, 16)


@pytest.mark.parametrize("raw, message", [
    ([1, 2], "JSON object"),
    ({"id": "x"}, "exactly one of"),
    ({"model_input": {"input_ids": [[1, 2]]}, "synthetic": {"batch": 1}}, "exactly one of"),
    ({"model_input": {"input_ids": [[1, 2], [3]]}}, "ragged"),
    ({"model_input": {"input_ids": [[1.5, 2]]}}, "integers"),
    ({"model_input": {"input_ids": [[True, 2]]}}, "integers"),
    ({"model_input": {"input_ids": "1 2 3"}}, "nested list"),
    ({"model_input": {"pixels": [[1]]}}, "unknown model input"),
    ({"model_input": {"input_ids": [[1, 2]]}, "colour": "red"}, "unknown keys"),
    ({"model_input": {"input_ids": [[1, 2]]}, "objective": "speed"}, "objective"),
    ({"model_input": {"input_ids": [[1, 2]]}, "max_fidelity_loss": 3}, "max_fidelity_loss"),
    ({"synthetic": {"batch": 99}}, "max batch"),
    ({"synthetic": {"batch": 2, "image_size": 32}}, "text model"),
    ({"model_input": {"input_ids": [[1]] * 5}}, "max batch 4"),
])
def test_bad_text_requests(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_request(raw, BERT, max_batch=4)


def test_nan_and_inf_pixels_are_refused():
    pixels = torch.rand(1, 3, 32, 32).tolist()
    pixels[0][1][2][3] = float("nan")
    text = json.dumps({"id": "n", "pixel_values": pixels})  # Python writes NaN, which json.loads accepts
    with pytest.raises(ValueError, match="NaN or infinite"):
        parse_request(load_request_json(text), VIT, max_batch=4)
    pixels[0][1][2][3] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        parse_request({"pixel_values": pixels}, VIT, max_batch=4)


def test_malformed_and_oversized_json():
    with pytest.raises(ValueError, match="not valid JSON"):
        load_request_json('{"id": 1, "model_input": ')
    with pytest.raises(ValueError, match="exceeds"):
        load_request_json(" " * (MAX_REQUEST_BYTES + 1))


def test_check_inputs_for_the_python_api():
    assert check_inputs({"pixel_values": torch.rand(2, 3, 32, 32)}, max_batch=2) == 2
    with pytest.raises(ValueError, match="max batch"):
        check_inputs({"pixel_values": torch.rand(3, 3, 32, 32)}, max_batch=2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_inputs({"pixel_values": torch.full((1, 3, 32, 32), float("inf"))}, max_batch=2)
    with pytest.raises(ValueError, match="not a torch.Tensor"):
        check_inputs({"pixel_values": [[1.0]]}, max_batch=2)
    with pytest.raises(ValueError, match="disagree"):
        check_inputs({"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4)}, 4)
    with pytest.raises(ValueError, match="non-empty dict"):
        check_inputs({}, max_batch=2)
