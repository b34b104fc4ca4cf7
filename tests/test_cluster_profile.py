"""Profiling the real cluster (loopback, no root): devices that joined a coordinator are measured by jobs
of a fixed registry over the epoch's lane, with the commands docs/DEPLOY.md gives a user —
`edgeprism join`, `edgeprism profile --listen`, `edgeprism serve --listen` without --profile — and a
device unlike the profiled one is refused with the reason."""

import json
import signal
import socket
import subprocess
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from devices import EDGEPRISM, join, stop
from edgeprism.comm.auth import new_secret, seal, write_secret_file
from edgeprism.comm.context import DistContext
from edgeprism.models.loading import load_model
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.profile.schema import Profile
from edgeprism.runtime.cluster_jobs import JOBS, JobContext, JobError, check_job, run_job_here
from edgeprism.runtime.control import ControlError, Mailbox, Session, encode_control, validate_control
from edgeprism.runtime.coordinator import read_status
from edgeprism.runtime.engine import Engine

QUICK = ["--model", "vit-tiny-test", "--no-eval", "--batches", "1,2", "--repeats", "1", "--meter", "modelled"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]






def _wait_members(address, secret, members, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = read_status(address, secret, timeout_s=5)["members"]
        except (RuntimeError, ValueError):  # between coordinators
            last = None
        if last == list(members):
            return
        time.sleep(0.2)
    raise AssertionError(f"members {last}, expected {list(members)}")


@pytest.fixture()
def secret_file(tmp_path):
    return write_secret_file(tmp_path / "cluster.secret", new_secret())


def test_profile_listen_measures_the_joined_device(tmp_path, secret_file):
    address = f"127.0.0.1:{_free_port()}"
    device = join(address, secret_file, "--cores", "0")
    out = tmp_path / "cluster.profile.json"
    try:
        done = subprocess.run([*EDGEPRISM, "profile", "--listen", address, "--world-size", "2", "--secret-file",
                               str(secret_file), "--out", str(out), "--join-timeout", "60", *QUICK],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "waiting for devices: 1 of 1 joined (rank 1: host=" in done.stderr
        profile = Profile.load(out, expect_world_size=2)
        assert len(profile.device_speeds) == 2 and all(s > 0 for s in profile.device_speeds)
        assert "linktest over 2 ranks" in profile.link.method and profile.link.bandwidth_bps > 0
        assert [d.rank for d in profile.devices] == [0, 1]
        assert profile.devices[1].device_kind == "cpu" and profile.devices[1].num_cores == 1  # --cores 0
        assert all(d.energy is not None and d.energy.source == "modelled" for d in profile.devices)
        assert Profile.from_json(profile.to_json()) == profile
        assert "devices" in json.loads(out.read_text())
        # the coordinator closed: the device (retry mode) waits for the next one instead of exiting
        time.sleep(0.5)
        assert device.poll() is None
    finally:
        stop(device)


def test_serve_without_profile_profiles_first_and_refuses_an_unlike_device(tmp_path, secret_file):
    address = f"127.0.0.1:{_free_port()}"
    secret = secret_file.read_bytes()
    device = join(address, secret_file, "--cores", "0")
    serve = subprocess.Popen([*EDGEPRISM, "serve", "--listen", address, "--world-size", "2", "--secret-file",
                              str(secret_file), "--model", "vit-tiny-test", "--input", "-"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(serve.stderr), daemon=True)
    reader.start()
    others = []
    try:
        deadline = time.monotonic() + 90
        while not any("coordinator of vit-tiny-test" in line for line in lines):
            assert serve.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)
        text = "".join(lines)
        assert "no --profile: profiling the cluster" in text and "profiled in" in text
        _wait_members(address, secret, (0, 1))  # the profiled device joined the serving coordinator

        assert stop(device, signal.SIGINT) == 0  # it leaves; an unlike device takes its place
        _wait_members(address, secret, (0,))
        unlike = join(address, secret_file, "--cores", "0,1", "--no-retry")
        others.append(unlike)
        assert unlike.wait(timeout=60) != 0
        reason = unlike.stderr.read()
        assert "matches none of the profile's free device ranks" in reason, reason
        assert "cpu, 2 cores" in reason and "rank 1: cpu, 1 core" in reason, reason

        alike = join(address, secret_file, "--cores", "1")  # one core, like the profiled device
        others.append(alike)
        _wait_members(address, secret, (0, 1))
        serve.stdin.write(json.dumps({"id": "r1", "synthetic": {"batch": 2, "image_size": 64}}) + "\n")
        serve.stdin.close()
        assert serve.wait(timeout=60) == 0, "".join(lines)[-3000:]
        assert json.loads(serve.stdout.read().splitlines()[-1])["id"] == "r1"
    finally:
        stop(serve)
        stop(device)
        for proc in others:
            stop(proc)


def test_the_job_registry_refuses_unknown_names_and_arguments():
    assert set(JOBS) == {"compute", "link", "exchange_cost", "energy"}
    with pytest.raises(ValueError, match="unknown job 'os.system'"):
        check_job("os.system", {})
    link = {"latency_repeats": 5, "bandwidth_target_s": 0.1, "timeout_s": 60}
    check_job("link", link)
    with pytest.raises(ValueError, match="unexpected"):
        check_job("link", {**link, "code": "import os"})
    with pytest.raises(ValueError, match="latency_repeats"):
        check_job("link", {**link, "latency_repeats": 10 ** 9})
    cost = {"nbytes": 1 << 20, "width": 768, "rounds": 3, "workload_s": 1.5, "timeout_s": 60}
    check_job("exchange_cost", cost)
    with pytest.raises(ValueError, match="nbytes"):
        check_job("exchange_cost", {**cost, "nbytes": 1 << 40})
    with pytest.raises(ValueError, match="grid shape"):
        check_job("compute", {"shapes": [[1, 2, 1, "local"]], "overhead": [], "warmup": 0, "repeats": 1,
                              "timeout_s": 60})
    for message in ({"op": "job", "epoch": 1, "name": "__import__", "args": {}},
                    {"op": "job", "epoch": 1, "name": "link", "args": {**link, "eval": "1"}}):
        with pytest.raises(ControlError):
            validate_control(message)
    model = load_model("vit-tiny-test")
    engine = Engine(model, synthetic_profile("vit-tiny-test", world_size=1),
                    DistContext(group_rank=0, world_size=1, backend="gloo", device=torch.device("cpu"), timeout_s=10))
    with pytest.raises(ValueError, match="unknown job"):
        engine.run_job("shell", {"cmd": "true"})


def test_a_job_op_not_in_the_registry_never_reaches_the_worker():
    store = dist.HashStore()
    key = b"k" * 32
    session = Session(rank=1, slot=1, key=key)
    forged = json.dumps({"op": "job", "epoch": 1, "name": "subprocess.run", "args": {}}).encode()
    store.set(session.key_of(0), seal(key, session.channel, 0, forged))  # sealed with the right key, even

    def then_a_ping() -> None:  # a dropped message is waited past: the next one comes in the same slot
        while store.check([session.key_of(0)]):
            time.sleep(0.01)
        store.set(session.key_of(0), seal(key, session.channel, 0, encode_control({"op": "ping", "epoch": 1})))

    threading.Thread(target=then_a_ping, daemon=True).start()
    mailbox = Mailbox(store, Session(rank=1, slot=1, key=key))
    assert mailbox.receive(timeout_s=5) == {"op": "ping", "epoch": 1}  # the job was dropped, not run
    assert mailbox.refused == 1


def test_a_job_failing_on_a_rank_is_an_error_naming_that_rank():
    store = dist.HashStore()
    model = load_model("vit-tiny-test")
    outcome: dict = {}
    args = {"meter": "modelled", "power_model": "", "num_tokens": 4, "window_s": 0.05, "timeout_s": 30}

    def rank(r: int) -> None:
        group = dist.ProcessGroupGloo(dist.PrefixStore("job/", store), r, 2, timedelta(seconds=30))
        ctx = DistContext(group_rank=r, world_size=2, backend="gloo", device=torch.device("cpu"), timeout_s=30,
                          group=group)
        try:  # rank 7's model is missing: its `prepare` fails, and rank 0 names it
            outcome[r] = run_job_here(JobContext(ctx, model if r == 0 else None), "energy", args, (0, 7))
        except Exception as err:
            outcome[r] = err

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(outcome[0], JobError) and "failed on rank 7" in str(outcome[0]), outcome
    assert outcome[1] is None
