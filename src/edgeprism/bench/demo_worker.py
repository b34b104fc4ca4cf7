"""One rank of the demo job (run under torchrun on each testbed host): rank 0 drives, the rest serve.

    python -m edgeprism.bench.demo_worker --spec '<DemoSpec JSON>'
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [demo %(process)d] %(name)s: %(message)s")
    from edgeprism.bench.demo import DemoSpec, drive
    from edgeprism.comm.context import init_distributed, shutdown
    from edgeprism.runtime.engine import Engine, EngineConfig

    spec = DemoSpec.from_json(args.spec)
    ctx = init_distributed("gloo", timeout_s=300.0)
    try:
        config = EngineConfig(objective=spec.objective, max_fidelity_loss=spec.max_fidelity_loss,
                              max_batch=max(spec.batches), probe_every=0)
        engine = Engine.from_profile(spec.model, spec.profile, seed=spec.seed, ctx=ctx, config=config)
        if ctx.is_root:
            drive(engine, spec)
            engine.close()
        else:
            engine.serve_workers()
    except Exception as err:
        print(f"rank {ctx.group_rank}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise
    finally:
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
