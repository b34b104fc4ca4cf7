"""A worker rank of the engine: join, get admitted, then serve rank 0's plans until it says shutdown.

Started by `Engine.launch_local` / `edgeprism serve` (or by hand under torchrun's environment)::

    python -m edgeprism.runtime.worker --spec '{"model": "vit-tiny-test", "profile": "p.json", ...}'

Spec keys: model, checkpoint (or null), seed, profile (path), config (EngineConfig fields), timeout_s,
device, and for a local cluster store ("host:port" of rank 0's rendezvous store) and bind_addr (where
this rank's lanes listen). With a store the worker needs no process group of its own: it connects to
the store, proves it holds the cluster secret (EDGEPRISM_SECRET_FILE) and is taken in, so the same
command also brings a lost rank back into a running engine (RANK names the rank). Without one it
joins torchrun's group (MASTER_ADDR, RANK, WORLD_SIZE). A failing worker logs its error and exits
non-zero; rank 0 carries on without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger(__name__)


def _store_context(spec: dict):
    """(ctx, store) for a worker of a local cluster: a client of rank 0's store, no process group."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from edgeprism.comm.context import DistContext, pin_cpu, parse_cores

    host, _, port = str(spec["store"]).rpartition(":")
    cores = parse_cores(os.environ.get("EDGEPRISM_CORES", ""))
    if cores:
        pin_cpu(cores)
    link = None
    if os.environ.get("EDGEPRISM_LINK_FILE"):
        from edgeprism.testbed.emulation import EmulatedLink

        link = EmulatedLink.from_env(os.environ)
    timeout_s = float(spec.get("timeout_s", 60.0))
    ctx = DistContext(group_rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), backend="gloo",
                      device=torch.device(spec.get("device", "cpu")), timeout_s=timeout_s, link=link, cores=cores)
    store = dist.TCPStore(host, int(port), None, False, timedelta(seconds=timeout_s))
    return ctx, dist.PrefixStore("edgeprism/", store)


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

    if spec.get("store"):
        ctx, store = _store_context(spec)
    else:
        timeout_s = float(spec.get("timeout_s", 60.0))
        ctx, store = init_distributed("gloo", spec.get("device", "cpu"), timeout_s=timeout_s), None
    try:
        model = load_model(spec["model"], spec.get("checkpoint"), seed=int(spec.get("seed", 0)))
        profile = Profile.load(spec["profile"])
        engine = Engine(model, profile, ctx, EngineConfig(**spec.get("config", {})), store=store,
                        bind_addr=spec.get("bind_addr"))
        served = engine.serve_workers()
        log.info("rank %d served %d distributed requests", ctx.group_rank, served)
    except Exception as err:
        log.error("rank %d failed: %s: %s", ctx.group_rank, type(err).__name__, err)
        print(f"rank {ctx.group_rank}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if store is None:
            shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
