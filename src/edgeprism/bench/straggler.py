"""A straggler mid-run: the adaptive engine serves a stream of requests while one device's CPU quota is
lowered (to a quarter) and later restored; one row per request says which devices the plan used, with
what shares, how long it took and the engine's live speed estimate of every device.

Rank 0 of a testbed job runs `straggler_rank`'s driver; at request `slow_at` (and `restore_at`) it writes
`speed-N.request` into the control folder and waits for `speed-N.ack`: the launching process
(`scripts/bench_straggler.py`) changes the quota with `Testbed.set_speed` in between. Timings are
measured with the engine's own metrics row.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass

from edgeprism.comm.context import DistContext
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.runtime.config import EngineConfig
from edgeprism.runtime.engine import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StragglerSpec:
    model: str
    profile: str
    batch: int = 1
    requests: int = 24
    slow_rank: int = 1
    slow_at: int = 6
    """Request index before which the slow rank's quota is lowered."""
    restore_at: int = 14
    """Request index before which it is restored."""
    control_dir: str = ""
    seed: int = 0
    allow_unmeasured_codecs: bool = False
    """Opt in to codecs of unmeasured fidelity (random weights: faithful codecs over wifi4 keep ViT-B local, and a
    local plan waits on no device, so the straggler would show nothing); the output says so."""
    codecs: tuple[str, ...] | None = None
    """Plan only with these of the profile's codecs (None: any the budget admits)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _wait_for_driver(control_dir: str, name: str, timeout_s: float = 60.0) -> None:
    with open(os.path.join(control_dir, f"{name}.request"), "w") as handle:
        handle.write(name)
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(os.path.join(control_dir, f"{name}.ack")):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the driver did not answer {name} within {timeout_s} s")
        time.sleep(0.05)


def straggler_rank(ctx: DistContext, args: dict, progress=None) -> list[dict] | None:
    """Rank function (`edgeprism.comm.job`): rank 0 serves the requests and reports one row per request
    (also as progress lines); the other ranks serve."""
    spec = StragglerSpec(**json.loads(args["spec"]))
    # The device's speed is what changes here: plan by the profile's link (a shared host's noisy link
    # estimate would move plans too and hide what the speed estimate does).
    engine = Engine.from_profile(spec.model, spec.profile, seed=spec.seed, ctx=ctx,
                                 config=EngineConfig(max_batch=spec.batch, probe_every=0, learn_link=False,
                                                     allow_unmeasured_codecs=spec.allow_unmeasured_codecs,
                                                     codecs=tuple(spec.codecs or ())))
    if not ctx.is_root:
        engine.serve_workers()
        return None
    inputs = synthetic_inputs(engine.model.config, spec.batch, seed=spec.seed)
    engine.infer(inputs)  # warm-up (first plan shapes pay set-up), not recorded
    rows = []
    phase = "normal"
    for index in range(spec.requests):
        if index == spec.slow_at:
            _wait_for_driver(spec.control_dir, "slow")
            phase = "slowed"
        elif index == spec.restore_at:
            _wait_for_driver(spec.control_dir, "restore")
            phase = "restored"
        result = engine.infer(inputs)
        m = result.metrics
        row = {"request": index, "phase": phase, "latency_s": m.latency_s,
               "predicted_latency_s": m.predicted_latency_s, "ranks": list(m.plan.get("ranks", [0])),
               "token_counts": list(m.plan.get("token_counts", [])), "codec": m.plan.get("codec") or "local",
               "speed_scale": [engine.speed_estimator.scale(r) for r in range(ctx.world_size)],
               "fallback": m.fallback}
        rows.append(row)
        if progress:
            progress(json.dumps(row))
    engine.close()
    return rows


__all__ = ["StragglerSpec", "straggler_rank"]
