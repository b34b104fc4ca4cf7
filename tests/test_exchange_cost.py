"""The compute a device loses to exchanging (profile/exchange_cost.py): measured on every rank at once, kept in
the profile's link section, and charged by the cost model per byte each rank receives."""

from __future__ import annotations

import dataclasses

import pytest

from edgeprism.comm.launch import JobSession
from edgeprism.compress.registry import get_codec
from edgeprism.plan.cost import distributed_terms, rank_compute_s
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.profile import CodecFidelity
from edgeprism.profile.exchange_cost import exchange_cost_rank, message_bytes, seconds_per_byte
from edgeprism.profile.schema import Profile


def _with_cost(profile, seconds_per_byte: float):
    return dataclasses.replace(profile, link=dataclasses.replace(profile.link,
                                                                 exchange_compute_s_per_byte=seconds_per_byte))


@pytest.mark.parametrize("codec_name", ["fp16", "kv50:int8"])
def test_the_cost_model_charges_each_rank_per_byte_it_receives(codec_name):
    base = synthetic_profile("vit-base-patch16-224", world_size=3, device_speeds=(1.0, 0.5, 1.0))
    costly = _with_cost(base, 40e-9)
    codec = CodecFidelity.from_codec(get_codec(codec_name), base.model.hidden_size)
    counts, batch = (80, 40, 77), 4
    speeds = base.device_speeds
    plain = distributed_terms(base, batch, speeds, counts, codec, 50e6, 3e-3)
    charged = distributed_terms(costly, batch, speeds, counts, codec, 50e6, 3e-3)
    # every rank receives the other messages padded to the largest (GLOO's all-gather); the slowest rank's
    # layer grows by the bytes over its speed: here the half-speed rank 1, which was already the slowest
    widest = codec.wire_tokens(max(counts)) if codec.kv_share else max(counts)
    received = 2 * batch * (codec.wire_bytes_per_row + codec.wire_bytes_per_token * widest)
    layers = base.model.num_layers
    assert charged.compute_s - plain.compute_s == pytest.approx(layers * 40e-9 * received / 0.5, rel=1e-9)
    assert (charged.network_s, charged.latency_s) == (plain.network_s, plain.latency_s)
    before, after = rank_compute_s(base, batch, counts, codec), rank_compute_s(costly, batch, counts, codec)
    assert [b - a for a, b in zip(before, after)] == pytest.approx([layers * 40e-9 * received] * 3, rel=1e-9)


def test_a_profile_from_before_the_measurement_loads_and_charges_nothing():
    profile = synthetic_profile("vit-base-patch16-224", world_size=2)
    data = profile.to_dict()
    del data["link"]["exchange_compute_s_per_byte"]
    assert Profile.from_dict(data).link.exchange_compute_s_per_byte == 0.0
    with pytest.raises(ValueError, match="exchange_compute_s_per_byte"):
        _with_cost(profile, -1e-9)


def test_the_profile_figure_is_the_median_rank_at_speed_one_and_messages_stay_in_range():
    raw = {"seconds_per_byte": [10e-9, 40e-9, 30e-9]}
    assert seconds_per_byte(raw, (1.0, 0.5, 1.0)) == pytest.approx(20e-9)  # [10, 20, 30] ns at speed 1
    assert message_bytes(8, 197, 4, 768) == 8 * 50 * 768
    assert message_bytes(1, 17, 2, 64) == 64 << 10 and message_bytes(64, 4096, 2, 4096) == 4 << 20


def test_every_rank_measures_what_a_background_all_gather_costs_its_compute():
    """Two processes on this machine's loopback: a number per rank, never negative, and the all-gathers it
    counted finished inside the busy turn."""
    with JobSession(2) as session:
        raw = session.run(exchange_cost_rank, {"nbytes": 256 << 10, "width": 64, "rounds": 2, "workload_s": 0.3})
    assert len(raw["seconds_per_byte"]) == 2 and all(x >= 0 for x in raw["seconds_per_byte"])
    assert raw["allgathers"] >= 1 and raw["nbytes"] == 256 << 10
    assert all(0 < r <= raw["allgathers"] * (256 << 10) for r in raw["received_bytes"])
    assert all(a > 0 and b > 0 for a, b in zip(raw["alone_s"], raw["busy_s"]))
