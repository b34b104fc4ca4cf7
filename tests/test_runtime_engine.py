"""The engine over real GLOO process groups: this test process is rank 0, workers are processes.

Profiles are synthetic with the compute scaled up (tiny models, big predicted compute), so that on a
fast link splitting wins and on a slow one local wins; the link is an emulated link file in transport
mode, rewritten mid-run (no root needed).
"""

import logging
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from edgeprism.comm import launch as comm_launch
from edgeprism.comm.launch import WorkerError
from edgeprism.compress import get_codec
from edgeprism.models.config import get_config
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.plan import Limits
from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile
from edgeprism.profile import CodecFidelity
from edgeprism.runtime import EngineConfig, launch_local
from edgeprism.testbed.emulation import write_link_file
from edgeprism.testbed.presets import LinkPreset

VIT = get_config("vit-tiny-test")
FAST = LinkPreset("test-fast", rate_bps=1e9, delay_s=0.0, source="test")
SLOW = LinkPreset("test-slow", rate_bps=1e9, delay_s=0.15, source="test")
FP32_ONLY = synthetic_codecs(VIT.hidden_size)[:1]


def _profile(device_speeds):
    # Local predicts ~0.4 s for 17 tokens; two ranks ~0.27 s + 4 link latencies: distributed wins below
    # ~35 ms of link latency, local above.
    return synthetic_profile("vit-tiny-test", device_speeds=device_speeds, bandwidth_bps=1e9, latency_s=1e-4,
                             seconds_per_image=3000, codecs=FP32_ONLY)


def test_plan_follows_a_mid_run_link_change(tmp_path, caplog):
    link_file = tmp_path / "link.json"
    write_link_file(link_file, FAST, "transport")
    batch = synthetic_inputs(VIT, 2, seed=1)
    # The link is what changes here: plan by the profile's compute alone (the synthetic profile's compute
    # is far from a tiny model's, which online compute re-estimation would otherwise correct).
    config = EngineConfig(probe_every=2, learn_compute=False)
    with caplog.at_level(logging.WARNING, logger="edgeprism.runtime.engine"):
        with launch_local(2, "vit-tiny-test", _profile((1.0, 1.0)), link_file=link_file,
                                 config=config) as engine:
            modes = [engine.infer(batch).metrics.mode for _ in range(2)]
            assert modes == ["distributed", "distributed"]

            write_link_file(link_file, SLOW, "transport")
            after_slow = [engine.infer(batch).metrics for _ in range(5)]
            first_local = next(i for i, m in enumerate(after_slow) if m.mode == "local")
            assert first_local < 5
            assert all(m.mode == "local" for m in after_slow[first_local:])
            # the estimate saw the slow link: its time for this request's layer message (true: >= 150 ms)
            message = after_slow[0].layer_nbytes / (2 * VIT.num_layers)
            m = after_slow[-1]
            assert m.link_latency_s + 8 * message / m.link_bandwidth_bps > 0.05, m

            write_link_file(link_file, FAST, "transport")  # local plans send nothing: probes must notice
            after_fast = [engine.infer(batch).metrics.mode for _ in range(5)]
            assert "distributed" in after_fast, after_fast
    assert any("over 2.0 x its prediction" in r.getMessage() for r in caplog.records)


class _CountCollectives:
    """Counts torch.distributed calls made by this process (rank 0 takes part in every group)."""

    NAMES = ("broadcast", "all_gather", "send", "recv", "isend", "irecv", "reduce", "gather", "barrier")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.NAMES:
            original = getattr(dist, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(dist, name, counted)


def test_subsets_exactness_idle_workers_and_bad_requests(monkeypatch):
    small = synthetic_inputs(VIT, 2, seed=2)  # 17 tokens: the planner takes ranks [0, 1]
    large = synthetic_inputs(VIT, 2, image_size=64, seed=3)  # 65 tokens: all three ranks, uneven shares
    # The plans below follow from the profile: no online link estimate (3 ranks on 2 cores make a noisy link).
    config = EngineConfig(max_batch=2, learn_compute=False, learn_link=False, learn_speeds=False)
    # rank 2 at 0.4: worth its fixed per-layer cost (K/V rows of every token) for 65 tokens, not for 17
    with launch_local(3, "vit-tiny-test", _profile((1.0, 1.0, 0.4)), config=config) as engine:
        for inputs, ranks in ((small, [0, 1]), (large, [0, 1, 2]), (small, [0, 1])):
            result = engine.infer(inputs, gather_hidden=True)
            assert result.metrics.mode == "distributed" and result.metrics.plan["ranks"] == ranks
            assert result.metrics.bytes_exchanged > result.metrics.layer_nbytes > 0
            assert 0 < result.metrics.cpu_s  # rank 0's process CPU over the request
            with torch.no_grad():
                reference = engine.model(inputs)
            for key, value in result.outputs.items():
                assert torch.allclose(value, reference[key], atol=1e-5, rtol=0), key
        # A request's own codec list holds (an engine's list would only narrow it): none allowed -> local.
        assert engine.plan_for(large, limits=Limits(None, codecs=())).mode == "local"
        assert engine.plan_for(large, limits=Limits(None, codecs=("fp32",))).codec == "fp32"

        # Bad requests: a clear ValueError each, nothing sent, and the next request is served.
        nan = small["pixel_values"].clone()
        nan[0, 0, 0, 0] = float("nan")
        bad = [({"pixel_values": nan}, "NaN"), ({"pixel_values": small["pixel_values"][:, :2]}, "channels"),
               ({"pixel_values": torch.ones(2, 3, 32, 32, dtype=torch.long)}, "dtype"),
               ({"pixel_values": torch.rand(3, 3, 32, 32)}, "max batch"),
               ({"input_ids": torch.ones(2, 5, dtype=torch.long)}, "pixel_values")]
        counter = _CountCollectives(monkeypatch)
        for inputs, message in bad:
            with pytest.raises(ValueError, match=message):
                engine.infer(inputs)
        assert counter.calls == []

        # A local plan leaves the workers waiting: rank 0 makes no collective at all.
        engine.estimator.latency_s = 10.0
        result = engine.infer(small)
        assert result.metrics.mode == "local" and result.metrics.bytes_exchanged == 0
        assert 0 < result.metrics.cpu_s
        assert counter.calls == []
        engine.estimator.latency_s = 1e-4
        monkeypatch.undo()
        result = engine.infer(small)
        assert result.metrics.mode == "distributed"
        assert result.metrics.energy_source == "modelled" and result.metrics.energy_j > 0
        assert len(engine.history) == 5


_MISMATCH = """
import sys
from edgeprism.comm.context import init_distributed, shutdown
from edgeprism.models.loading import load_model
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.runtime import Engine
ctx = init_distributed("gloo", timeout_s=30)
try:
    Engine(load_model("vit-tiny-test", seed=ctx.group_rank), synthetic_profile("vit-tiny-test"), ctx)
except ValueError as err:
    print(f"rank {ctx.group_rank}: {err}", file=sys.stderr)
    sys.exit(3)
finally:
    shutdown(ctx)
"""


def test_ranks_that_start_differently_are_refused_on_every_rank():
    with pytest.raises(WorkerError, match=r"rank 1: weights differ"):
        comm_launch.launch_local(2, ["-c", _MISMATCH], timeout_s=120)


def test_generate_after_a_distributed_prefill_equals_single_device_greedy_decoding(monkeypatch):
    from edgeprism.models.gpt2 import greedy_generate

    config = get_config("gpt2-tiny-test")
    profile = synthetic_profile("gpt2-tiny-test", device_speeds=(1.0, 1.0), bandwidth_bps=1e9, latency_s=1e-4,
                                seconds_per_image=3000, codecs=synthetic_codecs(config.hidden_size)[:1])
    prompt = {"input_ids": torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))}
    with launch_local(2, "gpt2-tiny-test", profile, config=EngineConfig(learn_compute=False)) as engine:
        reference = greedy_generate(engine.model, prompt, 6)
        checks = []
        real_validate = engine.model.validate_input
        monkeypatch.setattr(engine.model, "validate_input", lambda x: checks.append(1) or real_validate(x))
        split = engine.generate(prompt, 6)
        assert split.metrics.mode == "distributed" and split.metrics.plan["ranks"] == [0, 1]
        assert len(checks) == 1  # one input check for a generate request too
        assert torch.equal(split.outputs["tokens"], reference)
        local = engine.infer(prompt, generate=6, plan=_local_plan_of(engine, prompt))
        assert local.metrics.mode == "local" and torch.equal(local.outputs["tokens"], reference)
        with pytest.raises(ValueError, match="positions"):
            engine.generate(prompt, config.max_positions)
    bert = launch_local(1, "bert-tiny-test", synthetic_profile("bert-tiny-test", world_size=1))
    with bert, pytest.raises(ValueError, match="encoder"):
        bert.generate({"input_ids": torch.ones(1, 4, dtype=torch.long)}, 3)


def _local_plan_of(engine, inputs):
    plan = engine.plan_for(inputs)
    tokens = engine.model.validate_input(inputs)
    return replace(plan, mode="local", ranks=(0,), token_shares=(1.0,), token_counts=(tokens,), codec="", cr=1,
                   wire_dtype="")


def test_one_splitter_one_header_one_input_check(monkeypatch):
    """The cost model's counts are the plan's ranges are what the split sends; a distributed request sends
    no second header over the lane; rank 0 checks a request's input once."""
    from edgeprism.partition.transform import PositionWise
    from edgeprism.plan import LinkEstimate, Request, choose_plan

    speeds = (1.0, 0.7, 0.4)
    fp32 = synthetic_codecs(get_config("vit-tiny-test").hidden_size)[:1]
    profile = synthetic_profile("vit-tiny-test", device_speeds=speeds, bandwidth_bps=1e9, latency_s=1e-4,
                                seconds_per_image=3000, codecs=fp32)
    inputs = synthetic_inputs(get_config("vit-tiny-test"), 2, image_size=48, seed=5)  # 37 tokens: uneven thirds
    splits = []
    real_split = PositionWise.split

    def recording_split(self, inputs, ranges, *args, **kwargs):
        header, parts = real_split(self, inputs, ranges, *args, **kwargs)
        splits.append(header["ranges"])
        return header, parts

    monkeypatch.setattr(PositionWise, "split", recording_split)
    config = EngineConfig(learn_compute=False, learn_link=False, learn_speeds=False)
    with launch_local(3, "vit-tiny-test", profile, config=config) as engine:
        checks = []
        real_validate = engine.model.validate_input
        monkeypatch.setattr(engine.model, "validate_input", lambda x: checks.append(1) or real_validate(x))
        result = engine.infer(inputs)
        plan = result.metrics.plan
        ranks = plan["ranks"]
        assert result.metrics.mode == "distributed" and len(ranks) >= 2, plan
        # the pure planner's split (balanced to the speeds; the slowest device gets the fewest tokens)
        counts = choose_plan(profile, Request("vit-tiny-test", 2, 37), LinkEstimate(1e9, 1e-4)).token_counts
        assert tuple(plan["token_counts"]) == counts and counts[0] > counts[1] > counts[2]
        ends = [sum(counts[:i + 1]) for i in range(len(counts))]
        assert splits == [[[start, end] for start, end in zip([0, *ends[:-1]], ends)]]
        assert len(checks) == 1
        kinds = engine._lanes[tuple(ranks)].exchanger.stats.per_kind_nbytes
        assert "control" not in kinds and kinds.get("scatter", 0) > 0, kinds  # the split came with the control op
        for _ in range(2):  # per request: one control message per worker of the plan, nothing else on the lane
            checks.clear()
            again = engine.infer(inputs)
            assert again.metrics.plan["ranks"] == ranks and len(checks) == 1
            control = engine._control.stats
            assert control.per_kind_messages == {"control": len(ranks) - 1}, control.per_kind_messages
            assert len({nbytes for _, nbytes, _, _ in control.events}) == 1  # the same header to each worker
            assert again.metrics.bytes_exchanged >= control.per_kind_nbytes["control"] > 0
            lane = engine._lanes[tuple(ranks)].exchanger.stats.per_kind_messages
            assert "control" not in lane and lane["scatter"] == len(ranks) - 1, lane
        with torch.no_grad():
            reference = engine.model(inputs)
        assert torch.allclose(result.outputs["cls"], reference["cls"], atol=1e-5)
        checks.clear()
        engine.plan_for(inputs)
        assert len(checks) == 1
        with pytest.raises(ValueError, match="forced plan splits"):  # a forced plan must be for this request
            engine.infer(inputs, plan=replace(engine.plan_for(inputs), token_counts=(1,) * len(ranks)))


def test_llama_generates_after_an_uneven_three_rank_prefill_as_one_device():
    from edgeprism.models.gpt2 import greedy_generate

    config = get_config("llama-tiny")
    profile = synthetic_profile("llama-tiny", device_speeds=(1.0, 0.4, 0.7), bandwidth_bps=1e9, latency_s=1e-4,
                                seconds_per_image=3000, codecs=synthetic_codecs(config.exchange_width)[:1])
    prompt = {"input_ids": torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))}
    with launch_local(3, "llama-tiny", profile, config=EngineConfig(learn_compute=False)) as engine:
        reference = greedy_generate(engine.model, prompt, 8)
        split = engine.generate(prompt, 8)
        assert split.metrics.mode == "distributed" and split.metrics.plan["ranks"] == [0, 1, 2]
        counts = split.metrics.plan["token_counts"]
        assert len(set(counts)) == 3, counts  # uneven shares, by speed
        assert torch.equal(split.outputs["tokens"], reference)


def test_the_engine_runs_a_kv_share_the_planner_chose_exactly():
    """A kv share end to end: the planner picks it (compute-bound ranks, a fast link, the engine's overlapped
    path), the workers run it, and at fp32 the answer is the one-device model's."""
    codecs = (FP32_ONLY[0], CodecFidelity.from_codec(get_codec("kv100:fp32"), VIT.hidden_size, num_layers=2))
    profile = replace(_profile((1.0, 1.0, 1.0)), codecs=codecs)
    inputs = synthetic_inputs(VIT, 2, image_size=64, seed=3)  # 65 tokens over three ranks
    config = EngineConfig(max_batch=2, learn_compute=False, learn_link=False, learn_speeds=False)
    with launch_local(3, "vit-tiny-test", profile, config=config) as engine:
        result = engine.infer(inputs, gather_hidden=True)
        assert result.metrics.mode == "distributed" and result.metrics.plan["codec"] == "kv100:fp32"
        with torch.no_grad():
            reference = engine.model(inputs)
        for key, value in result.outputs.items():
            assert torch.allclose(value, reference[key], atol=1e-5, rtol=0), key
