"""The one job entry point (`edgeprism.comm.job`) and its launcher (`comm.launch.run_job`)."""

import pytest

from edgeprism.comm.job import collective_timeout_s, function_name, resolve
from edgeprism.comm.launch import WorkerError, job_argv, run_job
from edgeprism.compress.registry import get_codec
from edgeprism.partition.selfcheck import selfcheck
from edgeprism.profile.compute import compute_grid
from edgeprism.profile.compute_job import compute_rank, grid_plan


def test_a_rank_function_is_named_by_reference_and_found_again():
    name = function_name(selfcheck)
    assert name == "edgeprism.partition.selfcheck:selfcheck" and resolve(name) is selfcheck

    def nested(ctx, args, progress):
        return None

    with pytest.raises(ValueError, match="module-level function"):
        function_name(nested)
    with pytest.raises(ValueError, match="package.module:function"):
        resolve("edgeprism.partition.selfcheck")


def test_one_timeout_policy_and_one_command_line(tmp_path):
    assert collective_timeout_s(300) == 300 and collective_timeout_s(12 * 3600) == 900
    argv = job_argv(selfcheck, "a.json", "out.json", "progress", 3600.0)
    assert argv[:3] == ["-m", "edgeprism.comm.job", "edgeprism.partition.selfcheck:selfcheck"]
    assert argv[argv.index("--timeout-s") + 1] == "900"


def test_a_failing_rank_function_raises_here_with_its_error():
    with pytest.raises(WorkerError, match="(?s)rank \\d failed .*zip9"):
        run_job(2, selfcheck, {"codec": "zip9", "models": ["vit-tiny-test"]}, timeout_s=120)


def test_progress_lines_arrive_while_the_job_runs_and_the_result_comes_back():
    shapes = compute_grid([8], [1], 2, [get_codec("fp32")])
    plan = {"model": "bert-tiny-test", "checkpoint": None, "seed": 0, "device": "cpu",
            **grid_plan(shapes, [(1, 8)], warmup=0, repeats=1)}
    lines = []
    raw = run_job(2, compute_rank, plan, timeout_s=180, dist_backend="gloo", on_progress=lines.append, poll_s=0.1)
    total = len(shapes) + 1
    assert len(lines) == total and lines[-1].startswith(f"{total}\t{total}\t")
    assert len(raw["shared_samples_s"]) == 2 and raw["overhead_s"]
