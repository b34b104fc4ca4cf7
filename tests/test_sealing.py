"""Private data lanes (edgeprism.comm.sealing, docs/SECURITY.md): every lane message sealed with
ChaCha20-Poly1305 under a per-lane, per-epoch key; altered, forged, replayed or misdirected messages are
refused; a sealed cluster answers exactly as one device; a message that does not open drops its sender."""

import pytest
import torch

from devices import maintain_until
from edgeprism.comm.sealing import (
    OVERHEAD_BYTES,
    LaneSealer,
    TamperError,
    is_loopback,
    lane_key,
    lane_store_tag,
    lanes_sealed,
)
from edgeprism.models.config import get_config
from edgeprism.models.gpt2 import greedy_generate
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile
from edgeprism.runtime import EngineConfig, launch_local

SECRET, BOOT = b"s" * 32, b"b" * 16


def _payload(n=100):
    return torch.arange(n, dtype=torch.uint8)


def test_a_sealed_message_opens_once_for_its_receiver_and_never_reveals_the_payload():
    key = lane_key(SECRET, BOOT, 3, (0, 1))
    sender, receiver = LaneSealer(key, 1), LaneSealer(key, 0)
    payload = _payload()
    first = sender.seal(payload, "layer")
    assert first.numel() == payload.numel() + OVERHEAD_BYTES
    assert bytes(payload.numpy()) not in bytes(first.numpy())  # ciphertext, not the activations
    assert torch.equal(receiver.open(first, 1, "layer"), payload)
    second = sender.seal(payload, "layer")
    assert not torch.equal(first, second)  # a fresh nonce per message: same payload, other bytes
    with pytest.raises(TamperError, match="replayed"):
        receiver.open(first, 1, "layer")  # the first one again
    flipped = second.clone()
    flipped[-20] ^= 1
    with pytest.raises(TamperError, match="failed authentication"):
        receiver.open(flipped, 1, "layer")
    with pytest.raises(TamperError, match="failed authentication"):  # taken as another kind of message
        receiver.open(second, 1, "output")
    with pytest.raises(TamperError, match="expected sender 2"):  # claimed by another rank
        receiver.open(second, 2, "layer")
    assert torch.equal(receiver.open(second, 1, "layer"), payload)  # the refusals left no trace
    with pytest.raises(TamperError, match="fewer than"):
        receiver.open(torch.zeros(OVERHEAD_BYTES - 1, dtype=torch.uint8), 1, "layer")


def test_keys_differ_per_epoch_lane_coordinator_and_secret_and_only_holders_derive_them():
    base = lane_key(SECRET, BOOT, 3, (0, 1))
    others = [lane_key(SECRET, BOOT, 4, (0, 1)), lane_key(SECRET, BOOT, 3, (0, 1, 2)),
              lane_key(SECRET, b"c" * 16, 3, (0, 1)), lane_key(b"t" * 32, BOOT, 3, (0, 1))]
    assert len({base, *others}) == 5 and all(len(k) == 32 for k in others)
    outsider = LaneSealer(lane_key(b"t" * 32, BOOT, 3, (0, 1)), 1)
    with pytest.raises(TamperError, match="without this lane's key"):
        LaneSealer(base, 0).open(outsider.seal(_payload(), "layer"), 1, "layer")
    assert lane_store_tag(SECRET, BOOT, 3) != lane_store_tag(SECRET, BOOT, 4) != lane_store_tag(b"t" * 32, BOOT, 4)


def test_sealing_is_on_by_default_off_loopback_and_on_needs_a_secret():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("192.168.1.10") and not is_loopback(None) and not is_loopback("device-1.lan")
    assert lanes_sealed("auto", True, "10.0.0.2") and not lanes_sealed("auto", True, "127.0.0.1")
    assert not lanes_sealed("auto", False, "10.0.0.2")  # no secret: no key only members hold (a warning says so)
    assert lanes_sealed("on", True, "127.0.0.1") and not lanes_sealed("off", True, "10.0.0.2")
    with pytest.raises(ValueError, match="needs a cluster secret"):
        lanes_sealed("on", False, "10.0.0.2")
    with pytest.raises(ValueError, match="auto, on, off"):
        EngineConfig(seal_lanes="yes")


def test_a_sealed_cluster_answers_exactly_as_one_device_and_drops_a_peer_whose_message_does_not_open():
    """CR = 1 (fp32) with sealing on over 3 ranks, uneven shares: the same answers as the local model, every
    layer message 28 bytes longer, and the sum-reduce replaced by sealed sends; then a replayed message."""
    vit, gpt = get_config("vit-tiny-test"), get_config("gpt2-tiny-test")
    config = EngineConfig(max_batch=2, learn_compute=False, learn_link=False, learn_speeds=False,
                          seal_lanes="on", join_check_s=0.05, micro_batches=1,  # one layer message per layer
                          regroup_timeout_s=2.0, min_stall_s=2.0)
    for cfg, inputs, extra in ((vit, synthetic_inputs(vit, 2, image_size=64, seed=3), {"gather_hidden": True}),
                               (gpt, synthetic_inputs(gpt, 1, seq_len=24, seed=4), {"generate": 3})):
        profile = synthetic_profile(cfg.name, device_speeds=(1.0, 1.0, 0.7), bandwidth_bps=1e9, latency_s=1e-4,
                                    seconds_per_image=3000, codecs=synthetic_codecs(cfg.hidden_size)[:1])
        with launch_local(3, cfg.name, profile, config=config) as engine:
            assert engine.sealed
            result = engine.infer(inputs, **extra)
            assert result.metrics.mode == "distributed" and result.metrics.plan["ranks"] == [0, 1, 2]
            with torch.no_grad():
                if "generate" in extra:
                    reference = {"tokens": greedy_generate(engine.model, inputs, extra["generate"])}
                else:
                    reference = engine.model(inputs)
            for key, value in result.outputs.items():
                if value.is_floating_point():
                    assert torch.allclose(value, reference[key], atol=1e-5, rtol=0), (cfg.name, key)
                else:
                    assert torch.equal(value, reference[key]), (cfg.name, key)
            exchanger = engine._lanes[(0, 1, 2)].exchanger
            assert exchanger.sealer is not None and exchanger.stats.sealing_s > 0
            sent = [e[1] for e in exchanger.stats.events if e[0] == "layer"]
            assert len(sent) == cfg.num_layers
            if not cfg.causal:  # an all-gather: each rank's sealed message, padded to the largest one
                per_token = int(synthetic_codecs(cfg.hidden_size)[0].wire_bytes_per_token) * 2  # batch 2
                assert (sent[0] - OVERHEAD_BYTES) % per_token == 0, (sent[0], per_token)
            assert engine.security_counts()["sealed_lanes"] == 1
            if not cfg.causal:
                _replay_drops_the_sender(engine, inputs, reference)



def _replay_drops_the_sender(engine, inputs, reference):
    """Rank 0's lane state is moved on as if it had already taken rank 1's next million messages, so that what
    rank 1 sends now reads as a replay (as a recorded message re-sent by someone on the path would): the
    request is answered exactly by rank 0, rank 1 is dropped, joins again, and serves the next one."""
    import time

    members = engine.healthy_ranks
    engine._lanes[members].exchanger.sealer.last_seen[1] = 10**6
    result = engine.infer(inputs)
    assert "replayed" in result.metrics.fallback
    assert all(torch.allclose(v, reference[k], atol=1e-5, rtol=0) for k, v in result.outputs.items())
    assert engine.security_counts()["tampered_lane_messages"] == 1
    assert any("rank 1 dropped: a lane message did not open" in what for _, what in engine._membership.events)
    deadline = time.monotonic() + 60
    while engine.healthy_ranks != members and time.monotonic() < deadline:
        engine.maintain()
        time.sleep(0.05)
    again = engine.infer(inputs)
    assert again.metrics.mode == "distributed" and not again.metrics.fallback
    assert all(torch.allclose(v, reference[k], atol=1e-5, rtol=0) for k, v in again.outputs.items())

    # Now the workers catch it: rank 0's counter goes back, so what it sends reads to them as a replay. They
    # report it (sealed, over the store); rank 0 reruns the request and drops them (the link to rank 0 is
    # what is not safe); they join again and serve.
    engine._lanes[members].exchanger.sealer.sent = 0
    caught = engine.infer(inputs)
    assert caught.metrics.fallback
    assert all(torch.allclose(v, reference[k], atol=1e-5, rtol=0) for k, v in caught.outputs.items())
    maintain_until(engine, lambda: engine.security_counts()["tampered_lane_messages"] >= 2
                   and engine.healthy_ranks == members)
    assert any("from rank 0 did not open" in what for _, what in engine._membership.events)
    last = engine.infer(inputs)
    assert last.metrics.mode == "distributed" and not last.metrics.fallback


def test_the_profile_records_sealing_per_codec_and_the_planner_charges_it_only_when_lanes_are_sealed():
    from dataclasses import replace

    from edgeprism.plan import Request, choose_plan
    from edgeprism.plan.cost import predict
    from edgeprism.plan.types import Limits, LinkEstimate
    from edgeprism.profile.schema import Profile
    from edgeprism.profile.sealing import SealingCost, SealingSample, codec_messages, fit_sealing, measure_sealing

    base = synthetic_profile("vit-base-patch16-224", device_speeds=(1.0, 1.0, 1.0))
    messages = codec_messages(base.codecs, 197, 3)
    assert set(messages) == {c.codec for c in base.codecs} and messages["fp32"] > min(messages.values()) > 0
    measured = measure_sealing(messages, repeats=3)
    assert [s.codec for s in measured.samples] == list(messages) and measured.overhead_bytes == OVERHEAD_BYTES
    assert all(s.seal_open_s > 0 for s in measured.samples)
    line = fit_sealing([SealingSample("a", 1000, 3e-6), SealingSample("b", 3000, 5e-6)], "two points")
    assert abs(line.per_message_s - 2e-6) < 1e-12 and abs(line.per_byte_s - 1e-9) < 1e-15
    with pytest.raises(ValueError, match="sealing"):
        SealingCost(OVERHEAD_BYTES, -1.0, 0.0)

    # A profile without sealing keeps its JSON and hash; with it, the cost round-trips.
    assert "sealing" not in base.to_json()
    cost = SealingCost(OVERHEAD_BYTES, 20e-6, 1e-9, measured.samples, "test")
    sealed_profile = replace(base, sealing=cost)
    assert Profile.from_json(sealed_profile.to_json()).sealing == cost

    request = Request(base.model.name, 1, 197)
    plain_link, sealed_link = LinkEstimate(5e7, 2e-3), LinkEstimate(5e7, 2e-3, sealed=True)
    # opt in to the synthetic profile's lossy codecs (faithful by default, issue 16): a split is what is charged here
    plan = choose_plan(sealed_profile, request, sealed_link, limits=Limits(None, allow_unmeasured_codecs=True))
    assert plan.mode == "distributed"
    k, layers = len(plan.ranks), base.model.num_layers
    unsealed = predict(sealed_profile, request, plan, plain_link)
    sealed = predict(sealed_profile, request, plan, sealed_link)
    assert predict(base, request, plan, sealed_link) == unsealed  # nothing measured: nothing charged
    # every layer message carries the overhead (received by k - 1 ranks), and so do the scatter and the outputs
    extra = sealed.wire_bytes - unsealed.wire_bytes
    assert layers * (k - 1) * OVERHEAD_BYTES <= extra <= (layers + 1) * (k - 1) * OVERHEAD_BYTES, extra
    assert sealed.staging_s > unsealed.staging_s + layers * 0.5 * k * cost.per_message_s
    assert sealed.total_s > unsealed.total_s and sealed.compute_s == unsealed.compute_s
