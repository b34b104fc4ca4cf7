"""Devices that join a coordinator over the network (here: loopback, no root needed), with the commands
docs/DEPLOY.md gives a user: `edgeprism join ADDR:PORT --secret-file F` and `edgeprism cluster status`.

The test process is the coordinator (`launch_engine(..., local_workers=False)`, what `edgeprism serve
--listen` runs); each device is an `edgeprism join` process. A device joins late, a device with the wrong
secret is refused, one leaves with Ctrl-C, one is killed mid-request and comes back: every answer is
exact (equal to the single-device model).
"""

import json
import signal
import subprocess
import time

import pytest
import torch

from devices import EDGEPRISM, join, stop
from edgeprism.calibrate.checkpoint import save_checkpoint
from edgeprism.comm.auth import new_secret, write_secret_file
from edgeprism.models.config import get_config
from edgeprism.models.loading import load_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile
from edgeprism.runtime import EngineConfig, launch_engine
from edgeprism.runtime.coordinator import read_status

VIT = get_config("vit-tiny-test")
# Plans by the profile alone: what is tested here is membership, not the live link estimate.
CONFIG = EngineConfig(min_stall_s=1.5, stall_factor=3.0, regroup_timeout_s=1.0, join_check_s=0.1, probe_every=0,
                      group_timeout_s=10.0, learn_compute=False, learn_link=False, learn_speeds=False)
LARGE = synthetic_inputs(VIT, 2, image_size=64, seed=3)  # 65 tokens: the planner takes every rank it has


def _profile(world_size):
    return synthetic_profile("vit-tiny-test", device_speeds=(1.0,) * world_size, bandwidth_bps=1e9, latency_s=1e-4,
                             seconds_per_image=3000, codecs=synthetic_codecs(VIT.hidden_size)[:1])




def _exact(engine, inputs, result):
    with torch.no_grad():
        reference = engine.model(inputs)
    for key, value in result.outputs.items():
        assert torch.allclose(value, reference[key], atol=1e-5, rtol=0), key


def _wait_members(engine, members, timeout_s=60.0, count=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = engine.cluster_status()["members"]
        if (tuple(now) == tuple(members)) if members is not None else len(now) == count:
            return
        time.sleep(0.1)  # the coordinator's ticker takes devices in between requests
    raise AssertionError(f"members {engine.cluster_status()['members']}, expected {members}")




@pytest.fixture()
def secret_file(tmp_path):
    return write_secret_file(tmp_path / "cluster.secret", new_secret())


def test_devices_join_late_leave_die_and_rejoin_every_answer_exact(tmp_path, secret_file):
    devices = []
    engine = launch_engine(3, "vit-tiny-test", _profile(3), config=CONFIG, local_workers=False,
                           bind_addr="127.0.0.1", port=0, secret_file=secret_file)
    try:
        alone = engine.infer(LARGE)  # no device yet: answered by the coordinator alone
        assert alone.metrics.mode == "local"
        _exact(engine, LARGE, alone)

        devices.append(join(engine.address, secret_file, "--cores", "0"))
        _wait_members(engine, (0, 1))
        two = engine.infer(LARGE)
        assert two.metrics.mode == "distributed" and two.metrics.plan["ranks"] == [0, 1]
        _exact(engine, LARGE, two)

        wrong = write_secret_file(tmp_path / "wrong.secret", new_secret())
        intruder = join(engine.address, wrong, "--no-retry")
        assert intruder.wait(timeout=60) == 3
        assert "secret" in intruder.stderr.read()

        devices.append(join(engine.address, secret_file, "--cores", "1"))  # a late device
        _wait_members(engine, (0, 1, 2))
        three = engine.infer(LARGE)
        assert three.metrics.plan["ranks"] == [0, 1, 2] and not three.metrics.fallback
        _exact(engine, LARGE, three)
        status = read_status(engine.address, secret_file.read_bytes(), timeout_s=10)
        assert [r["state"] for r in status["ranks"]] == ["serving"] * 3
        assert status["ranks"][1]["cores"] == [0] and status["ranks"][2]["cores"] == [1]
        shown = subprocess.run([*EDGEPRISM, "cluster", "status", engine.address, "--secret-file", str(secret_file),
                                "--json"], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["members"] == [0, 1, 2]

        assert stop(devices[1], signal.SIGINT) == 0  # Ctrl-C: the device says it leaves
        _wait_members(engine, (0, 1))
        after_leave = engine.infer(LARGE)
        assert after_leave.metrics.plan["ranks"] == [0, 1] and not after_leave.metrics.fallback
        _exact(engine, LARGE, after_leave)

        devices[0].kill()  # SIGKILL: no goodbye; the next request that needs it is rerun on rank 0
        devices[0].wait()
        lost = engine.infer(LARGE)
        _exact(engine, LARGE, lost)
        assert lost.metrics.fallback or lost.metrics.mode == "local"

        devices.append(join(engine.address, secret_file, "--cores", "0"))  # the board comes back
        _wait_members(engine, None, count=2)  # as whichever rank is free when it asks (1 may not be yet)
        back = engine.infer(LARGE)
        assert len(back.metrics.plan["ranks"]) == 2 and not back.metrics.fallback
        _exact(engine, LARGE, back)
    finally:
        engine.close()
        for proc in devices:
            stop(proc, signal.SIGKILL, 5.0)


def test_a_device_with_other_weights_is_refused_with_the_reason(tmp_path, secret_file):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    save_checkpoint(load_model("vit-tiny-test", seed=1), mine)
    save_checkpoint(load_model("vit-tiny-test", seed=2), theirs)
    engine = launch_engine(2, "vit-tiny-test", _profile(2), config=CONFIG, local_workers=False,
                           bind_addr="127.0.0.1", port=0, secret_file=secret_file, checkpoint=str(mine))
    try:
        device = join(engine.address, secret_file, "--no-retry", "--checkpoint", str(theirs))
        code = device.wait(timeout=120)
        err = device.stderr.read()
        assert code == 2 and "weights" in err, err
        status = engine.cluster_status()
        assert status["members"] == [0]
        assert any("weights" in e["what"] for e in status["last_errors"])
        unready = join(engine.address, secret_file, "--no-retry")  # no --checkpoint where one is served
        assert unready.wait(timeout=120) == 2 and "--checkpoint" in unready.stderr.read()
    finally:
        engine.close()


def test_join_without_a_secret_or_with_a_bad_address_is_a_clear_error(tmp_path):
    for argv, needle in ((["join", "127.0.0.1:1"], "no cluster secret"),
                         (["join", "nowhere", "--secret-file", str(tmp_path / "x")], "HOST:PORT")):
        done = subprocess.run([*EDGEPRISM, *argv], capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin"})
        assert done.returncode == 2 and needle in done.stderr, done.stderr


def test_serve_listen_requires_a_secret_file():
    done = subprocess.run([*EDGEPRISM, "serve", "--model", "vit-tiny-test", "--synthetic-profile", "--listen",
                           "127.0.0.1:0", "--http"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--secret-file" in done.stderr, done.stderr
