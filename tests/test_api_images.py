"""POST /v1/classify over a real one-rank vit-tiny-test engine: multipart uploads and raw image bodies,
labels when the adapter classifies, embeddings when it does not, and undecodable images refused."""

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("PIL")

from starlette.testclient import TestClient

from api_adapters import PillowIO, png_bytes
from edgeprism.api import ApiConfig, make_app
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.runtime import launch_local

MODEL = "vit-tiny-test"
LABELS = ["cat", "dog", "ship", "truck"]


@pytest.fixture(scope="module")
def engine():
    with launch_local(1, MODEL, synthetic_profile(MODEL, world_size=1)) as engine:
        yield engine


@pytest.fixture(scope="module")
def io():
    return PillowIO(MODEL, size=32, labels=LABELS)


@pytest.fixture(scope="module")
def client(engine, io):
    with TestClient(make_app(engine, io, ApiConfig(max_texts=3, max_body_bytes=200_000))) as client:
        yield client


def test_multipart_images_get_labels_matching_the_engine(client, engine, io):
    blobs = [png_bytes(1), png_bytes(2, size=50)]
    reply = client.post("/v1/classify", files=[("file", ("a.png", blobs[0], "image/png")),
                                               ("file", ("b.png", blobs[1], "image/png"))], data={"top_k": "2"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == MODEL and body["usage"] == {"images": 2}
    expected = io.classify(engine.infer(io.encode_images(blobs)).outputs, None, top_k=2)
    for item, pairs in zip(body["data"], expected):
        assert item["object"] == "classification" and len(item["labels"]) == 2
        assert [x["label"] for x in item["labels"]] == [label for label, _ in pairs]
        assert [x["score"] for x in item["labels"]] == pytest.approx([s for _, s in pairs], abs=1e-5)
    assert body["edgeprism"]["rows"] == 2 and reply.headers["x-edgeprism-plan"].startswith("local ranks=0")


def test_raw_png_and_jpeg_bodies(client):
    for kind, content_type in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
        reply = client.post("/v1/classify", content=png_bytes(3, kind=kind), headers={"Content-Type": content_type})
        assert reply.status_code == 200, reply.text
        assert len(reply.json()["data"]) == 1 and len(reply.json()["data"][0]["labels"]) == len(LABELS)  # top 5 of 4


def test_without_a_classifier_images_get_embeddings(engine):
    io = PillowIO(MODEL, size=32)
    with TestClient(make_app(engine, io)) as client:
        blob = png_bytes(4)
        reply = client.post("/v1/classify", content=blob, headers={"Content-Type": "image/png"})
        item = reply.json()["data"][0]
        assert item["object"] == "embedding"
        expected = engine.infer(io.encode_images([blob])).outputs["pooled"][0]
        assert torch.allclose(torch.tensor(item["embedding"]), expected, atol=1e-5)


@pytest.mark.parametrize("kwargs, status, code", [
    ({"content": b"not an image at all", "headers": {"Content-Type": "image/png"}}, 400, "invalid_image"),
    ({"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "invalid_image"),
    ({"files": [("file", ("x.png", b"garbage", "image/png"))]}, 400, "invalid_image"),
    ({"files": [("picture", ("x.png", b"garbage", "image/png"))]}, 400, "invalid_multipart"),
    ({"data": {"model": MODEL}}, 415, "unsupported_media_type"),  # a form without files is urlencoded
    ({"content": b"{}", "headers": {"Content-Type": "application/json"}}, 415, "unsupported_media_type"),
    ({"content": b"x" * 300_000, "headers": {"Content-Type": "image/png"}}, 413, "body_too_large"),
    ({"files": [("file", ("x.png", b"1", "image/png"))] * 4}, 400, None),  # over max_texts = 3
    ({"files": [("file", ("x.png", b"1", "image/png"))], "data": {"model": "other"}}, 404, "model_not_found"),
    ({"files": [("file", ("x.png", b"1", "image/png"))], "data": {"colour": "red"}}, 400, "unknown_parameter"),
])
def test_bad_uploads_are_refused_and_serving_goes_on(client, kwargs, status, code):
    good = {"content": png_bytes(5), "headers": {"Content-Type": "image/png"}}
    assert client.post("/v1/classify", **good).status_code == 200
    reply = client.post("/v1/classify", **kwargs)
    assert reply.status_code == status, reply.text
    if code:
        assert reply.json()["error"]["code"] == code
    assert client.post("/v1/classify", **good).status_code == 200


def test_text_endpoints_point_to_classify(client):
    error = client.post("/v1/embeddings", json={"model": MODEL, "input": "a"}).json()["error"]
    assert error["code"] == "unsupported_endpoint" and "/v1/classify" in error["message"]
