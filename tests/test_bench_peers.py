"""The peers compute what the local model computes: pipeline and tensor parallelism over 2 GLOO ranks
(torch.distributed.pipelining and tensor.parallel), and plain transformers with the same weights."""

import pytest
import torch

from edgeprism.bench.ranks import check_peers_rank
from edgeprism.comm.launch import run_job
from edgeprism.models.loading import build_model
from edgeprism.models.synthetic import synthetic_inputs

TOLERANCE = 1e-4


def test_pipeline_and_tensor_parallel_match_local():
    diffs = run_job(2, check_peers_rank, {"models": ["vit-tiny-test", "bert-tiny-test", "gpt2-tiny-test"]},
                    timeout_s=300, dist_backend="gloo")
    assert len(diffs) == 6, diffs
    assert all(value <= TOLERANCE for value in diffs.values()), diffs


@pytest.mark.parametrize("name", ["vit-tiny-test", "bert-tiny-test", "gpt2-tiny-test"])
def test_transformers_twin_has_our_weights(name):
    pytest.importorskip("transformers")
    from edgeprism.bench.transformers_twin import transformers_forward, transformers_twin

    model = build_model(name, seed=3)
    inputs = synthetic_inputs(model.config, 2, seed=4)
    with torch.no_grad():
        expected = model(inputs)["hidden"]
    assert (transformers_forward(transformers_twin(model), inputs) - expected).abs().max() <= TOLERANCE
