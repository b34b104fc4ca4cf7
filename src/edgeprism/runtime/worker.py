"""A worker rank of the engine: join, verify, then serve rank 0's plans until it says shutdown.

Started by `Engine.launch_local` / `edgeprism serve` (or by hand under torchrun's environment)::

    python -m edgeprism.runtime.worker --spec '{"model": "vit-tiny-test", "profile": "p.json", ...}'

Spec keys: model, checkpoint (or null), seed, profile (path), config (EngineConfig fields), timeout_s,
device. A failing worker logs its error, exits non-zero; rank 0 sees the broken connection.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="worker spec as JSON")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [worker %(process)d] %(name)s: %(message)s")

    from edgeprism.comm.context import init_distributed, shutdown
    from edgeprism.models.loading import load_model
    from edgeprism.profile.schema import Profile
    from edgeprism.runtime.engine import Engine, EngineConfig

    ctx = init_distributed("gloo", spec.get("device", "cpu"), timeout_s=float(spec.get("timeout_s", 60.0)))
    try:
        model = load_model(spec["model"], spec.get("checkpoint"), seed=int(spec.get("seed", 0)))
        profile = Profile.load(spec["profile"])
        engine = Engine(model, profile, ctx, EngineConfig(**spec.get("config", {})))
        served = engine.serve_workers()
        log.info("rank %d served %d distributed requests", ctx.group_rank, served)
    except Exception as err:
        log.error("rank %d failed: %s: %s", ctx.group_rank, type(err).__name__, err)
        print(f"rank {ctx.group_rank}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
