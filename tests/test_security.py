"""Security: only holders of the cluster secret join or drive workers; control messages are sealed,
bounded and validated before use; sockets listen on loopback; nothing is unpickled."""

import re
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from edgeprism.comm.auth import (
    JOIN_BYTES,
    AuthError,
    decode_join,
    encode_join,
    load_secret,
    open_sealed,
    seal,
    session_key,
)
from edgeprism.models.config import get_config
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile
from edgeprism.runtime import EngineConfig, launch_local
from edgeprism.runtime.control import MAX_CONTROL_BYTES, ControlError, decode_control, encode_control, validate_control
from edgeprism.runtime.groups import start_digests
from edgeprism.runtime.joining import join_cluster

VIT = get_config("vit-tiny-test")
SRC = Path(__file__).resolve().parents[1] / "src" / "edgeprism"
KEY = b"k" * 32


def _profile():
    return synthetic_profile("vit-tiny-test", device_speeds=(1.0, 1.0), bandwidth_bps=1e9, latency_s=1e-4,
                             seconds_per_image=3000, codecs=synthetic_codecs(VIT.hidden_size)[:1])


def _client(engine):
    host, _, port = engine.address.rpartition(":")
    return dist.PrefixStore("edgeprism/", dist.TCPStore(host, int(port), None, False, timedelta(seconds=10)))


def _listening(pids):
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & set(pids):
            found.append(line.split()[3])
    return found


def test_intruders_cannot_join_or_drive_and_every_socket_is_on_loopback():
    batch = synthetic_inputs(VIT, 2, seed=1)
    # Plans by the profile alone (learn_link off): on a busy host the live link estimate can tip this tiny
    # request to local, and this test is about intruders, not planning.
    with launch_local(
        2, "vit-tiny-test", _profile(), config=EngineConfig(join_check_s=0.05, learn_compute=False, learn_link=False,
                                                        learn_speeds=False)
    ) as engine:
        assert engine.infer(batch).metrics.mode == "distributed"
        store = _client(engine)
        digests = start_digests(engine.model, engine.profile)

        # 1. A process with the wrong secret (or none) asks to join as rank 1: refused before any field is read.
        for secret in (b"not-the-cluster-secret-at-all!!", None):
            with pytest.raises(AuthError, match="does not hold the cluster's secret"):
                _join_while_serving(engine, store, secret, digests)
        assert engine._membership.refusals and all("failed authentication" in r for r in engine._membership.refusals)
        assert engine.healthy_ranks == (0, 1)

        # 2. It forges a control message into the worker's mailbox: the worker drops it, unparsed.
        session = engine._control.sessions[1]
        forged = seal(b"guessed-key-guessed-key-guessed!", session.channel, session.sequence,
                      b'{"op":"shutdown"}')
        store.set(session.key_of(session.sequence), forged)
        time.sleep(0.5)
        result = engine.infer(batch)
        assert result.metrics.mode == "distributed" and not result.metrics.fallback
        assert "failed authentication" in engine.workers.stderr_tail(1)

        # 3. Every socket the engine's processes listen on is bound to 127.0.0.1.
        pids = [__import__("os").getpid(), engine.workers.pid(1)]
        listening = _listening(pids)
        assert listening and all(addr.startswith("127.0.0.1:") for addr in listening), listening


def _join_while_serving(engine, store, secret, digests):
    """Join in a thread while rank 0 keeps serving (it admits between requests)."""
    import threading

    box = {}

    def attempt():
        try:
            join_cluster(store, secret, 1, digests, timeout_s=10)
        except BaseException as err:
            box["error"] = err

    thread = threading.Thread(target=attempt)
    thread.start()
    while thread.is_alive():
        engine.maintain()
        time.sleep(0.02)
    raise box["error"]


def test_sealed_messages_are_checked_for_size_and_mac_before_parsing():
    blob = seal(KEY, b"ctl/1", 3, encode_control({"op": "ping", "epoch": 2}))
    assert decode_control(KEY, b"ctl/1", 3, blob) == {"op": "ping", "epoch": 2}
    tampered = blob[:-2] + b"9}"
    with pytest.raises(ControlError, match="failed authentication"):
        decode_control(KEY, b"ctl/1", 3, tampered)
    with pytest.raises(ControlError, match="failed authentication"):  # replayed at another sequence number
        decode_control(KEY, b"ctl/1", 4, blob)
    with pytest.raises(ControlError, match="failed authentication"):  # or on another worker's channel
        decode_control(KEY, b"ctl/2", 3, blob)
    with pytest.raises(ControlError, match="outside"):
        decode_control(KEY, b"ctl/1", 0, b"x" * (MAX_CONTROL_BYTES + 64))
    with pytest.raises(ControlError, match="outside"):
        decode_control(KEY, b"ctl/1", 0, b"short")
    # A correctly sealed body that is not JSON, or not of the schema, is refused too.
    with pytest.raises(ControlError, match="not JSON"):
        decode_control(KEY, b"c", 0, seal(KEY, b"c", 0, b"\x80\x81 not json"))
    with pytest.raises(ControlError, match="unknown control op"):
        decode_control(KEY, b"c", 0, seal(KEY, b"c", 0, b'{"op": "exec", "code": "rm -rf /"}'))


@pytest.mark.parametrize("message, problem", [
    ([1, 2], "an object with a string 'op'"),
    ({"op": 3}, "an object with a string 'op'"),
    ({"op": "ping"}, "missing"),
    ({"op": "ping", "epoch": 1, "extra": 1}, "unexpected"),
    ({"op": "ping", "epoch": "1"}, "epoch must be int"),
    ({"op": "ping", "epoch": True}, "epoch must be int"),
    ({"op": "probe", "epoch": 1, "ranks": [0, 1], "nbytes": 1 << 40, "stall_s": 1.0}, "probe of"),
    ({"op": "probe", "epoch": 1, "ranks": [0, -1], "nbytes": 8, "stall_s": 1.0}, "rank numbers"),
    ({"op": "epoch", "epoch": 1, "members": ["a"], "timeout_s": 1, "build_timeout_s": 1, "sealed": True},
     "rank numbers"),
    ({"op": "epoch", "epoch": 1, "members": [1], "timeout_s": 1, "build_timeout_s": 1, "sealed": 1},
     "sealed must be bool"),
])
def test_control_schema(message, problem):
    with pytest.raises(ControlError, match=problem):
        validate_control(message)


def test_join_requests_need_the_secret_and_the_exact_size():
    boot, nonce, digests = b"b" * 16, b"n" * 16, b"d" * 96
    blob = encode_join(KEY, boot, 7, 1, nonce, digests)
    assert len(blob) == JOIN_BYTES and decode_join(KEY, boot, 7, blob) == (1, nonce, digests)
    with pytest.raises(AuthError, match="does not hold"):
        decode_join(b"x" * 32, boot, 7, blob)
    with pytest.raises(AuthError, match="does not hold"):  # replayed into another slot
        decode_join(KEY, boot, 8, blob)
    with pytest.raises(AuthError, match="does not hold"):  # or into another cluster
        decode_join(KEY, b"c" * 16, 7, blob)
    with pytest.raises(AuthError, match="has 10 bytes"):
        decode_join(KEY, boot, 7, b"0" * 10)
    assert session_key(KEY, boot, 7, nonce) != session_key(KEY, boot, 8, nonce)
    with pytest.raises(AuthError):
        open_sealed(KEY, b"admit", 7, seal(b"y" * 32, b"admit", 7, b"{}"), 100)


def test_secret_loading(tmp_path):
    assert load_secret({}) is None
    assert load_secret({"EDGEPRISM_SECRET": "s" * 20}) == b"s" * 20
    with pytest.raises(ValueError, match="at least 16"):
        load_secret({"EDGEPRISM_SECRET": "short"})
    with pytest.raises(ValueError, match="cannot read the cluster secret"):
        load_secret({"EDGEPRISM_SECRET_FILE": str(tmp_path / "missing")})
    path = tmp_path / "secret"
    path.write_bytes(b"f" * 32 + b"\n")
    path.chmod(0o600)
    assert load_secret({"EDGEPRISM_SECRET_FILE": str(path), "EDGEPRISM_SECRET": "ignored-ignored-ignored"}) == b"f" * 32


def test_nothing_is_unpickled_at_run_time():
    """No pickle, no torch.load without weights_only=True; joblib only where assets are prepared."""
    problems = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        rel = path.relative_to(SRC).as_posix()
        for number, line in enumerate(text.splitlines(), start=1):
            code = line.split("#", 1)[0]
            if re.search(r"\bimport pickle\b|\bpickle\.loads?\(|\bcloudpickle\b|\bdill\b", code):
                problems.append(f"{rel}:{number}: pickle")
            if "torch.load(" in code and "weights_only=True" not in code:
                problems.append(f"{rel}:{number}: torch.load without weights_only=True")
            if "joblib.load(" in code and rel != "assets/convert.py":
                problems.append(f"{rel}:{number}: joblib.load outside asset preparation")
            if "allow_pickle=True" in code:
                problems.append(f"{rel}:{number}: allow_pickle=True")
            if re.search(r"\b(broadcast|all_gather|gather|scatter)_object(_list)?\(|\brecv_object_list\(|"
                         r"\bsend_object_list\(", code):
                problems.append(f"{rel}:{number}: torch.distributed object collective (pickles)")
    assert not problems, problems
