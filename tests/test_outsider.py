"""A stranger on the rendezvous store (docs/SECURITY.md): it connects to the coordinator's TCPStore (torch's
store refuses no client) and reads, lists, writes and deletes keys, replays a recorded join, moves the join
counter, takes a slot it never writes, and floods the store. The cluster keeps serving, answers stay exact,
nothing in the store holds an input, and each event is logged and counted (`Engine.security_counts`, the
gauges of /metrics). Loopback, no root; the same stranger on its own network namespace, sniffing the
link and poking the lane and HTTP ports, is tests/test_outsider_testbed.py."""

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from edgeprism.comm.auth import NONCE_BYTES, encode_join
from edgeprism.models.config import get_config
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile
from edgeprism.runtime import EngineConfig, launch_local
from edgeprism.runtime.groups import start_digests

VIT = get_config("vit-tiny-test")
P = "edgeprism//"  # the engine's keys as the store holds them (PrefixStore("edgeprism/") adds a "/")


def _profile():
    return synthetic_profile("vit-tiny-test", device_speeds=(1.0, 1.0), bandwidth_bps=1e9, latency_s=1e-4,
                             seconds_per_image=3000, codecs=synthetic_codecs(VIT.hidden_size)[:1])


def _exact(engine, inputs, reference):
    result = engine.infer(inputs)
    assert result.metrics.mode == "distributed" and not result.metrics.fallback, result.metrics.fallback
    for key, value in result.outputs.items():
        assert torch.allclose(value, reference[key], atol=1e-5, rtol=0), key


def _settle(engine, condition, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, engine.cluster_status()
        engine.maintain()
        time.sleep(0.05)


def test_a_stranger_on_the_store_reads_nothing_useful_and_cannot_stop_or_fool_the_cluster():
    config = EngineConfig(join_check_s=0.05, learn_compute=False, learn_link=False, learn_speeds=False,
                          seal_lanes="on", min_stall_s=5.0)
    inputs = synthetic_inputs(VIT, 2, seed=7)
    with launch_local(2, "vit-tiny-test", _profile(), config=config) as engine:
        with torch.no_grad():
            reference = engine.model(inputs)
        _exact(engine, inputs, reference)
        host, _, port = engine.address.rpartition(":")
        stranger = dist.TCPStore(host, int(port), None, False, timedelta(seconds=10))

        # 1. It lists and reads every key: control mailboxes, join replies, lane rendezvous, the spec. None
        #    holds the request's pixels (those travel only on the sealed lanes).
        keys = stranger.list_keys()
        assert any("/lane" in k for k in keys) and any(k.startswith(P) for k in keys)
        seen = b"".join(stranger.get(k) for k in keys if stranger.check([k]))
        pixels = inputs["pixel_values"].numpy().tobytes()
        assert not any(pixels[i:i + 32] in seen for i in range(0, len(pixels) - 32, 256))

        # 2. It overwrites the boot nonce and deletes the spec: rank 0 writes both back.
        boot = stranger.get(P + "auth/boot")
        stranger.set(P + "auth/boot", os.urandom(NONCE_BYTES))
        stranger.delete_key(P + "cluster/spec")
        _settle(engine, lambda: engine.security_counts()["restored_store_keys"] >= 2)
        assert stranger.get(P + "auth/boot") == boot and stranger.check([P + "cluster/spec"])

        # 3. It overwrites and deletes the lane rendezvous keys (of an epoch already connected: no effect;
        #    the next epoch's keys carry a tag only members can compute, and what the lanes carry is sealed).
        for key in keys:
            if "/lane" in key:
                stranger.set(key, b"garbage")
        _exact(engine, inputs, reference)

        # 4. A control message the worker never gets (deleted from the store before it read it: here rank 0
        #    skips a sequence number, which is what the worker then sees): the worker skips ahead.
        engine._control.sessions[1].sequence += 1
        _exact(engine, inputs, reference)
        assert "never arrived" in engine.workers.stderr_tail(1)

        # 5. It replays a recorded join (a valid request for an earlier slot, or from an earlier coordinator):
        #    refused either way, the worker's session untouched.
        refused = engine.security_counts()["refused_joins"]
        digests = b"".join(start_digests(engine.model, engine.profile).values())
        recorded = encode_join(engine._secret, boot, 1, 1, os.urandom(NONCE_BYTES), digests)
        for blob in (recorded, encode_join(engine._secret, os.urandom(NONCE_BYTES), 2, 1, b"n" * 16, digests)):
            slot = stranger.add(P + "join/slots", 1)
            stranger.set(f"{P}join/{slot}", blob)
        _settle(engine, lambda: engine.security_counts()["refused_joins"] == refused + 2)
        assert engine.healthy_ranks == (0, 1)

        # 6. It jumps the join counter and takes a slot it never writes; then the worker is dropped and joins
        #    again (a slot after both): admitted, and the next epoch serves.
        stranger.add(P + "join/slots", 500)
        stranger.add(P + "join/slots", 1)
        epoch = engine._epoch
        engine._membership.evict(1, "test: join again after the stranger's slots")
        _settle(engine, lambda: engine._epoch > epoch and engine.healthy_ranks == (0, 1))
        assert engine.security_counts()["skipped_join_slots"] >= 400
        _exact(engine, inputs, reference)
        events = " | ".join(what for _, what in engine._membership.events)  # the last 50, as cluster status shows
        assert "refused a join" in events and "restored" in events and "skipped" in events

        # 7. It floods the store: 2 000 small keys, 16 values of 1 MiB, 200 garbage join requests.
        for i in range(2000):
            stranger.set(f"flood/{i}", b"x" * 64)
        for i in range(16):
            stranger.set(f"{P}ctl/flood{i}", os.urandom(1 << 20))
        before = engine.security_counts()
        for _ in range(200):
            slot = stranger.add(P + "join/slots", 1)
            stranger.set(f"{P}join/{slot}", os.urandom(64))

        def handled():  # refused one by one, or skipped when the counter ran past rank 0's window of open slots
            now = engine.security_counts()
            return (now["refused_joins"] - before["refused_joins"]
                    + now["skipped_join_slots"] - before["skipped_join_slots"]) >= 200

        _settle(engine, handled)
        _exact(engine, inputs, reference)
        counts = engine.security_counts()
        assert counts["sealed_lanes"] == 1 and counts["tampered_lane_messages"] == 0
        assert "refused a join" in engine._membership.events[-1][1]
