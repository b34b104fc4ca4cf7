"""Measurement jobs over sealed lanes (edgeprism.runtime.cluster_jobs, docs/SECURITY.md): with
`seal_lanes="on"`, a profile job's results cross the lane sealed (kind "job"), the job still measures, and
a result that does not open (here: a replay, as someone on the path re-sending a recorded one would make)
fails the job on every rank, drops its sender, and the sender joins again and measures the next job; when
the worker is the one that catches it, its sealed report makes rank 0 drop it (the link to rank 0 is what
is not safe), and it joins again."""


import pytest

from devices import maintain_until
from edgeprism.models.config import get_config
from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile
from edgeprism.runtime import EngineConfig, launch_local

LINK_JOB = {"latency_repeats": 5, "bandwidth_target_s": 0.05, "timeout_s": 30}


def test_a_link_job_over_sealed_lanes_measures_and_a_tampered_result_is_refused_and_its_sender_dropped():
    cfg = get_config("vit-tiny-test")
    config = EngineConfig(max_batch=2, learn_compute=False, learn_link=False, learn_speeds=False, seal_lanes="on",
                          join_check_s=0.05, regroup_timeout_s=2.0, min_stall_s=2.0)
    profile = synthetic_profile(cfg.name, device_speeds=(1.0, 1.0), bandwidth_bps=1e9, latency_s=1e-4,
                                codecs=synthetic_codecs(cfg.hidden_size)[:1])
    with launch_local(2, cfg.name, profile, config=config) as engine:
        assert engine.sealed
        members = engine.healthy_ranks
        sealer = engine._lanes[members].exchanger.sealer
        before = sealer.sent
        results = engine.run_job("link", LINK_JOB)
        link = results[0]["link"]
        assert link["bandwidth_bps"] > 0 and link["latency_s"] > 0, link
        assert sealer.sent == before + 2 and sealer.last_seen[1] >= 2  # both steps' results crossed sealed

        # What rank 1 sends next reads as a replay to rank 0: refused, the job fails, rank 1 is dropped.
        sealer.last_seen[1] = 10**6
        with pytest.raises(RuntimeError, match="replayed or misdirected"):
            engine.run_job("link", LINK_JOB)
        assert engine.security_counts()["tampered_lane_messages"] == 1
        assert any("rank 1 dropped: a lane message did not open" in what for _, what in engine._membership.events)

        maintain_until(engine, lambda: engine.healthy_ranks == members)  # rank 1 joins again (new lane keys)
        again = engine.run_job("link", LINK_JOB)
        assert again[0]["link"]["bandwidth_bps"] > 0

        # Rank 0's counter goes back: what it sends reads to rank 1 as a replay. Rank 1 refuses it, every rank
        # leaves the job, rank 1 reports it, and rank 0 drops rank 1, which joins again.
        engine._lanes[members].exchanger.sealer.sent = 0
        with pytest.raises(RuntimeError, match="could not open a sealed job result"):
            engine.run_job("link", LINK_JOB)
        maintain_until(engine, lambda: engine.security_counts()["tampered_lane_messages"] >= 2
                       and engine.healthy_ranks == members)
        assert any("from rank 0 did not open" in what for _, what in engine._membership.events)
        assert engine.run_job("link", LINK_JOB)[0]["link"]["bandwidth_bps"] > 0
