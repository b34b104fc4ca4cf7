"""The position-wise split at CR = 1 equals one device, over several world sizes and uneven shares."""

import json
import os
import subprocess
import sys

import pytest

from edgeprism.comm.job import RESULT_PREFIX
from edgeprism.comm.launch import WorkerError, launch_local, run_job
from edgeprism.partition.ranges import split_tokens, validate_shares
from edgeprism.partition.selfcheck import selfcheck

TOLERANCE = 1e-5


def _selfcheck(world_size, shares=None):
    return run_job(world_size, selfcheck, {"shares": shares}, timeout_s=240)


@pytest.mark.parametrize("world_size,shares", [(1, None), (2, (0.7, 0.3)), (3, (0.5, 0.3, 0.2)), (4, None)])
def test_full_exchange_equals_single_device(world_size, shares):
    report = _selfcheck(world_size, shares)
    assert set(report["max_abs_diff"]) == {"vit-tiny-test", "dinov2-tiny-test", "bert-tiny-test", "gpt2-tiny-test",
                                           "llama-tiny"}
    for model, diff in report["max_abs_diff"].items():
        assert diff <= TOLERANCE, (model, diff)


def test_selfcheck_through_torchrun():
    """The one process main runs under plain torchrun too; without --out rank 0 prints its result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "edgeprism.comm.job", "edgeprism.partition.selfcheck:selfcheck",
                           "--args", '{"shares": [0.6, 0.4]}'],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX))
    report = json.loads(line.removeprefix(RESULT_PREFIX))
    assert report["world_size"] == 2
    assert max(report["max_abs_diff"].values()) <= TOLERANCE


def test_failing_worker_is_reported_and_others_stopped():
    script = ("import os, sys, time\n"
              "rank = int(os.environ['RANK'])\n"
              "if rank == 1:\n    print('boom on rank 1', file=sys.stderr); sys.exit(3)\n"
              "time.sleep(120)\n")
    with pytest.raises(WorkerError, match="(?s)rank 1 failed .*boom on rank 1"):
        launch_local(3, ["-c", script], timeout_s=60)


def test_split_tokens_uneven_and_minimum():
    ranges = split_tokens(17, (0.5, 0.3, 0.2))
    assert [r.num_tokens for r in ranges] == [9, 5, 3]
    assert ranges[0].start == 0 and ranges[-1].end == 17
    ranges = split_tokens(4, (0.97, 0.01, 0.01, 0.01))
    assert [r.num_tokens for r in ranges] == [1, 1, 1, 1]


@pytest.mark.parametrize("shares,message", [((0.5, 0.6), "sum to"), ((1.0, 0.0), "> 0"), ((1.5, -0.5), "> 0")])
def test_bad_shares(shares, message):
    with pytest.raises(ValueError, match=message):
        validate_shares(shares)


def test_more_ranks_than_tokens():
    with pytest.raises(ValueError, match="5 ranks for a request of 3 tokens"):
        split_tokens(3, (0.2,) * 5)


@pytest.mark.parametrize(("model", "world_size", "shares"), [("gpt2-tiny-test", 3, (0.4, 0.35, 0.25)),
                                                           ("llama-tiny", 2, (0.5, 0.5)),
                                                           ("llama-tiny", 3, (0.45, 0.2, 0.35))])
def test_decode_after_distributed_prefill_matches_local_greedy(model, world_size, shares):
    script = (
        "import json, torch\n"
        "from edgeprism.comm.context import init_distributed, shutdown\n"
        "from edgeprism.compress.registry import get_codec\n"
        "from edgeprism.models.gpt2 import greedy_generate\n"
        "from edgeprism.models.loading import build_model\n"
        "from edgeprism.models.synthetic import synthetic_inputs\n"
        "from edgeprism.partition.transform import PositionWise\n"
        "ctx = init_distributed()\n"
        f"model = build_model({model!r}, seed=5)\n"
        "engine = PositionWise(model, ctx, get_codec('fp32'))\n"
        "inputs = synthetic_inputs(model.config, 2, seq_len=23, seed=1) if ctx.is_root else None\n"
        f"tokens = engine.generate(inputs, 8, {shares!r})\n"
        "stats = engine.exchanger.stats\n"
        "if ctx.is_root:\n"
        "    ref = greedy_generate(model, inputs, 8)\n"
        "    print('RESULT', json.dumps({'equal': bool(torch.equal(tokens, ref)), 'shape': list(tokens.shape)}))\n"
        "shutdown(ctx)\n")
    results = launch_local(world_size, ["-c", script], timeout_s=120)
    line = next(x for x in results[0].stdout.splitlines() if x.startswith("RESULT "))
    report = json.loads(line.split(" ", 1)[1])
    assert report == {"equal": True, "shape": [2, 8]}
