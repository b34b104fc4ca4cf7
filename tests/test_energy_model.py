"""Modelled energy: the power-model registry, the pure arithmetic, and the labelled meter."""

from __future__ import annotations

import logging

import pytest

from edgeprism.energy import (
    PHASES,
    POWER_MODELS,
    ModelledMeter,
    PowerMeter,
    PowerModel,
    get_power_model,
    modelled_energy_j,
    modelled_measurement,
    modelled_parts_j,
)

MODEL = PowerModel("test", idle_w=2.0, compute_w=10.0, staging_w=5.0, radio_tx_w=1.5, radio_rx_w=1.0,
                   scope="test device", sources=("made up for the test",))


class FakeClock:
    def __init__(self) -> None:
        self.t_s = 0.0

    def __call__(self) -> float:
        return self.t_s


def test_registry_models_are_sourced_and_consistent():
    assert {"jetson-orin-nano-15w", "jetson-nano-5w", "laptop-cpu", "generic-cpu-core"} <= set(POWER_MODELS)
    for name, model in POWER_MODELS.items():
        assert model.name == name
        assert model.sources and model.scope
        assert model.idle_w <= model.staging_w <= model.compute_w
        assert PowerModel.from_dict(model.to_dict()) == model
    # a 15 W mode's sustained compute stays within its 15 W budget
    assert get_power_model("jetson-orin-nano-15w").compute_w <= 15.0
    assert get_power_model("jetson-nano-5w").compute_w <= 5.0
    with pytest.raises(TypeError):
        POWER_MODELS["mine"] = MODEL  # type: ignore[index]


def test_unknown_power_model_lists_known():
    with pytest.raises(ValueError, match=r"unknown power model 'orin'; known: \['generic-cpu-core'"):
        get_power_model("orin")


def test_power_model_validation():
    with pytest.raises(ValueError, match="idle_w is -1.0 W"):
        PowerModel("bad", -1.0, 1.0, 1.0, 0.0, 0.0, "x", ())
    with pytest.raises(ValueError, match="compute_w 1.0 W is below idle_w 2.0 W"):
        PowerModel("bad", 2.0, 1.0, 1.0, 0.0, 0.0, "x", ())


def test_modelled_energy_by_hand():
    phases = {"compute_s": 1.0, "staging_s": 0.2, "tx_s": 0.1, "rx_s": 0.1, "network_s": 0.4, "idle_s": 0.5}
    parts = modelled_parts_j(MODEL, phases)
    assert parts == pytest.approx({
        "compute_j": 10.0,
        "staging_j": 1.0,
        "tx_j": 0.1 * 3.5,
        "rx_j": 0.1 * 3.0,
        "network_j": 0.4 * 3.25,
        "idle_j": 1.0,
    })
    assert modelled_energy_j(MODEL, phases) == pytest.approx(sum(parts.values()))
    assert set(PHASES) == set(phases)


def test_modelled_energy_rejects_bad_phases():
    with pytest.raises(ValueError, match=r"unknown phase\(s\) \['gpu_s'\]"):
        modelled_energy_j(MODEL, {"gpu_s": 1.0})
    with pytest.raises(ValueError, match="compute_s lasted -1.0 s"):
        modelled_energy_j(MODEL, {"compute_s": -1.0})


def test_modelled_measurement_is_labelled_and_fills_idle():
    m = modelled_measurement("req", MODEL, {"compute_s": 1.0}, duration_s=1.5)
    assert m.source == "modelled" and m.meter == "model:test"
    assert m.parts_j == pytest.approx({"compute_j": 10.0, "idle_j": 1.0})
    assert m.energy_j == pytest.approx(11.0) and m.duration_s == 1.5
    assert "modelled by model:test" in str(m)


def test_modelled_meter_windows_with_fake_clock():
    clock = FakeClock()
    meter = ModelledMeter("jetson-orin-nano-15w", clock=clock)
    assert isinstance(meter, PowerMeter) and meter.source == "modelled"
    model = meter.power_model
    meter.begin_window("request")
    meter.add_phase("compute_s", 0.3)
    meter.begin_window("exchange")
    meter.add_phase("staging_s", 0.05)
    meter.add_phase("network_s", 0.15)
    clock.t_s = 0.2
    exchange = meter.end_window("exchange")
    clock.t_s = 1.0
    request = meter.end_window("request")
    assert exchange.source == request.source == "modelled"
    assert exchange.meter == "model:jetson-orin-nano-15w"
    assert exchange.energy_j == pytest.approx(0.05 * model.staging_w + 0.15 * (model.idle_w + 1.25))
    assert request.parts_j["idle_j"] == pytest.approx(0.5 * model.idle_w)  # 1.0 s - 0.5 s of phases
    assert request.energy_j == pytest.approx(
        0.3 * model.compute_w + 0.05 * model.staging_w + 0.15 * (model.idle_w + 1.25) + 0.5 * model.idle_w
    )


def test_modelled_meter_overlapping_phases_warn(caplog):
    clock = FakeClock()
    meter = ModelledMeter(MODEL, clock=clock)
    meter.begin_window("w")
    meter.add_phase("compute_s", 2.0)
    clock.t_s = 1.0
    with caplog.at_level(logging.WARNING, logger="edgeprism"):
        m = meter.end_window("w")
    assert "overlapping phases" in caplog.records[0].getMessage()
    assert m.parts_j["idle_j"] == 0.0 and m.energy_j == pytest.approx(20.0)
    with pytest.raises(ValueError, match="unknown phase 'gpu_s'"):
        meter.add_phase("gpu_s", 1.0)


def test_an_overlapped_rank_is_charged_for_its_compute_and_its_whole_link_time():
    """A rank's request energy (runtime/rank0_side.py `_energy`, fed `RankTelemetry.compute_s`): a link-bound rank whose
    exchange ran beside its compute is busy computing for everything but the link time it waited for; charging
    compute only for wall - link (as before) read an overlapped split as cheaper than one device."""
    from types import SimpleNamespace

    from edgeprism.plan.synthetic import synthetic_profile
    from edgeprism.runtime.rank0_side import Rank0Side
    from edgeprism.runtime.telemetry import RankTelemetry

    profile = synthetic_profile("vit-tiny-test")
    e = profile.energy
    rank = RankTelemetry(wall_s=1.0, nbytes_sent=0.0, layer_nbytes=0.0, staging_s=0.0, collective_s=0.8,
                         emulated_delay_s=0.0, hidden_s=0.7)
    assert rank.compute_s == pytest.approx(0.9)
    engine = SimpleNamespace(profile=profile, meter=None)
    energy_j, source = Rank0Side._energy(engine, "r", [(rank.compute_s, rank.staging_s, 0.8)])
    assert source == "modelled"
    assert energy_j == pytest.approx(e.compute_w * 0.9 + e.network_w * 0.8)
    local_j, _ = Rank0Side._energy(engine, "r", [(1.0, 0.0, 0.0)])
    assert local_j == pytest.approx(e.compute_w * 1.0)
