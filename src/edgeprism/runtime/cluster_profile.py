"""Profile the real cluster: devices that joined a coordinator, measured as the runtime will use them.

    report = profile_at(("192.168.1.10", 29400), 3, "cluster.secret", ProfileOptions(model="minilm-l6"), say)
    report.profile.save("cluster.profile.json")

`profile_at` starts a coordinator with a provisional (synthetic) profile — devices join it exactly as
they join a serving one, `edgeprism join ADDR:PORT --secret-file F` — waits until every device is in the
epoch's lanes, runs `profile_cluster`, and closes the coordinator: devices in retry mode go back to
waiting and join the next coordinator (`edgeprism serve --listen` with the new profile).

`profile_cluster(engine, options, say)` runs the jobs of edgeprism.runtime.cluster_jobs on every member
at once and builds the `Profile`: the compute table from rank 0's timings and a speed per device from
the grid timed side by side (`compute_job.critical_path`), the link as the engine's lanes see it
(the link test over the lane's group), staging per device (the profile keeps the slowest device's, the
one a distributed layer waits for), energy per device with each device's own meter (the profile's
`energy` is rank 0's, which the engine meters; every device's is in its description), and what each
rank is (`DeviceDescription`), which a later coordinator checks joining devices against.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import time
from collections.abc import Callable
from dataclasses import replace

from edgeprism.compress.registry import get_codec
from edgeprism.models.config import ModelConfig
from edgeprism.models.loading import load_model
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.profile.compute import ProgressFn, compute_grid, fit_errors, sparse_batches
from edgeprism.profile.compute_job import fit_result, grid_plan
from edgeprism.profile.exchange_cost import WORKLOAD_S, message_bytes, seconds_per_byte
from edgeprism.profile.link import link_section
from edgeprism.profile.profiler import (
    ProfileOptions,
    ProfileReport,
    fidelity_entries,
    host_facts,
    input_bytes_per_token,
    output_bytes_per_row,
    token_counts_for,
    validate_options,
)
from edgeprism.profile.schema import DeviceDescription, EnergyModel, Profile, StagingSample, StagingTable
from edgeprism.profile.sealing import codec_messages, measure_sealing
from edgeprism.runtime.cluster import launch_engine
from edgeprism.runtime.config import EngineConfig
from edgeprism.runtime.engine import Engine

JOB_TIMEOUT_S = 3600.0
"""GLOO timeout of a job's collectives: the compute job's other ranks wait while rank 0 times alone."""
PROFILE_CONFIG = EngineConfig(learn_link=False, probe_every=0, join_check_s=0.2, regroup_timeout_s=10.0)
"""The profiling coordinator: no link learning or probes between the jobs; devices taken in quickly."""


def provisional_profile(model_name: str, config: ModelConfig, world_size: int) -> Profile:
    """A synthetic profile for the model as loaded (`config`: a checkpoint's own): what the profiling
    coordinator publishes, so that devices start alike with it. Its numbers never plan anything."""
    profile = synthetic_profile(model_name, world_size=world_size)
    if profile.config_hash != config.config_hash():
        profile = replace(profile, model=config, config_hash=config.config_hash())
    return replace(profile, notes="provisional profile of a coordinator that profiles its devices; not measured")


def wait_for_devices(engine: Engine, say: Callable[[str], None], timeout_s: float, poll_s: float = 0.2) -> None:
    """Until every rank is in the engine's lanes, saying each change ("waiting for devices: 1 of 2 joined
    (rank 1: host=…, device=…, cores=…)"). TimeoutError naming who is missing after `timeout_s`."""
    wanted = engine.ctx.world_size
    deadline = time.monotonic() + timeout_s
    seen: tuple[int, ...] | None = None
    while True:
        status = engine.cluster_status()
        members = tuple(status["members"])
        if members != seen:
            seen = members
            joined = [entry for entry in status["ranks"] if entry["rank"] in members and entry["rank"] > 0]
            where = "; ".join(f"rank {e['rank']}: host={e.get('host', '?')}, device={e.get('device_kind', '?')}, "
                              f"cores={e.get('num_cores', '?')}" for e in joined)
            say(f"waiting for devices: {len(joined)} of {wanted - 1} joined" + (f" ({where})" if where else ""))
        if len(members) == wanted:
            return
        if time.monotonic() > deadline:
            missing = sorted(set(range(1, wanted)) - set(members))
            raise TimeoutError(f"ranks {missing} did not join within {timeout_s:.0f} s: start `edgeprism join "
                               f"{engine.address} --secret-file F` on each device")
        time.sleep(poll_s)


def profile_cluster(engine: Engine, options: ProfileOptions, say: Callable[[str], None] = lambda text: None,
                    progress: ProgressFn | None = None, latency_repeats: int = 20,
                    bandwidth_target_s: float = 0.25) -> ProfileReport:
    """Measure the engine's members (every rank must be in its lanes) and build their profile."""
    world = engine.ctx.world_size
    options = replace(options, world_size=world)
    validate_options(options)
    if tuple(engine.healthy_ranks) != tuple(range(world)):
        raise RuntimeError(f"profiling needs every rank in the cluster; connected: {list(engine.healthy_ranks)} "
                           f"of {world}")
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    phases: dict[str, float] = {}
    model = engine.model
    config = model.config
    token_counts = token_counts_for(config, options)
    codecs = [get_codec(name) for name in options.codec_names()]
    sampled = sparse_batches(options.batches, options.max_batch_points)
    shapes = compute_grid(token_counts, sampled, world, codecs)
    overhead_points = [(b, n) for n in token_counts for b in sampled]

    say(f"compute: {config.name}, batches {list(sampled)}, tokens {list(token_counts)}, one block per point, "
        f"timed on all {world} devices at once")
    mark = time.perf_counter()
    results = engine.run_job("compute", {**grid_plan(shapes, overhead_points, options.warmup, options.repeats),
                                         "timeout_s": JOB_TIMEOUT_S}, progress=progress)
    table, overhead, speeds = fit_result(results[0]["compute"], shapes, overhead_points, config.num_layers)
    fit_median, fit_max = fit_errors(table, overhead.per_token_s, config.num_layers)
    phases["compute_s"] = time.perf_counter() - mark
    say(f"compute: device speeds {speeds} (rank 0 = 1.0)")
    stagings = [_staging_table(r["staging"]["table"]) for r in results]
    staging = max(stagings, key=lambda t: t.d2h_seconds(1 << 20) + t.h2d_seconds(1 << 20) if t.present else -1.0)

    mark = time.perf_counter()
    say(f"link: link test over the lane of ranks {list(range(world))}")
    raw_link = engine.run_job("link", {"latency_repeats": latency_repeats, "bandwidth_target_s": bandwidth_target_s,
                                       "timeout_s": JOB_TIMEOUT_S})[0]["link"]
    emulated = engine.ctx.link.describe() if engine.ctx.link is not None else ""
    link = link_section(raw_link, f"emulated in the transport: {emulated}" if emulated else "")
    nbytes = message_bytes(max(sampled), max(token_counts), world, config.exchange_width)
    cost_job = {"nbytes": nbytes, "width": config.hidden_size, "rounds": 3, "workload_s": WORKLOAD_S,
                "timeout_s": JOB_TIMEOUT_S}
    raw_cost = engine.run_job("exchange_cost", cost_job)[0]["exchange_cost"]
    link = dataclasses.replace(link, exchange_compute_s_per_byte=seconds_per_byte(raw_cost, speeds))
    phases["link_s"] = time.perf_counter() - mark
    say(f"link: {link.latency_s * 1e3:.2f} ms per hop, {link.bandwidth_bps / 1e6:.2f} Mbit/s per rank in all-gather; "
        f"compute lost to exchanging {link.exchange_compute_s_per_byte * 1e9:.2f} ns per byte received")

    mark = time.perf_counter()
    energies = [EnergyModel(**r["energy"]) for r in engine.run_job(
        "energy", {"meter": options.meter, "power_model": options.power_model or "", "num_tokens": token_counts[0],
                   "window_s": 0.5, "timeout_s": JOB_TIMEOUT_S})]
    phases["energy_s"] = time.perf_counter() - mark
    say("energy: " + "; ".join(f"rank {r}: {e.source} ({e.meter.split(';')[0]})" for r, e in enumerate(energies)))

    mark = time.perf_counter()
    entries, fidelity_note = fidelity_entries(options, config, codecs, say)
    phases["fidelity_s"] = time.perf_counter() - mark
    say(f"fidelity: {fidelity_note}")
    sealing = measure_sealing(codec_messages(entries, token_counts[0], world))
    say(f"sealing: {sealing.per_message_s * 1e6:.1f} us per message + {sealing.per_byte_s * 1e9:.2f} ns per byte "
        f"(seal + open, {len(sealing.samples)} codecs)")

    devices = tuple(DeviceDescription(rank=rank, staging=r["staging"]["note"], energy=energies[rank], **r["device"])
                    for rank, r in enumerate(results))
    notes = "; ".join([
        f"joined cluster of {world} devices: " + "; ".join(str(d) for d in devices),
        f"compute: {len(shapes)} block timings on every device at once (batches {list(sampled)}, tokens "
        f"{list(token_counts)}), {options.warmup} warm-up + {options.repeats} repeats; fit median error "
        f"{fit_median:.1%}, max {fit_max:.1%}",
        f"device speeds: measured, median of rank 0's time over each rank's on the shared shapes {speeds}",
        f"staging: the slowest device's ({'measured' if staging.present else 'none: every device is a CPU'})",
        f"link: {link.method}", f"energy: rank 0's ({energies[0].source}); each device's in its description",
        fidelity_note])
    profile = Profile(
        model=config, config_hash=config.config_hash(), world_size=world, device_speeds=speeds,
        host=host_facts(engine.ctx.device, devices[0].num_cores), compute=table, staging=staging, link=link,
        energy=energies[0], codecs=entries,
        input_bytes_per_token=input_bytes_per_token(model, token_counts[0], world, options.image_size),
        output_bytes_per_row=output_bytes_per_row(model), sealing=sealing,
        created_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), notes=notes,
        devices=devices)
    return ProfileReport(profile=profile, profile_seconds=time.perf_counter() - started, phase_seconds=phases,
                         sampled_batches=sampled, token_counts=token_counts, num_compute_points=len(shapes),
                         fit_median_rel_error=fit_median, fit_max_rel_error=fit_max,
                         staging={"note": "; ".join(f"rank {rank}: {r['staging']['note']}"
                                                    for rank, r in enumerate(results)),
                                  "per_rank": [r["staging"] for r in results]}, link_test=raw_link,
                         fidelity_note=fidelity_note, load_average=(load_before, os.getloadavg()[0]))


def profile_at(listen: tuple[str, int], world_size: int, secret_file: str | os.PathLike, options: ProfileOptions,
               say: Callable[[str], None] = lambda text: None, progress: ProgressFn | None = None,
               join_timeout_s: float = 600.0, seed: int = 0, **measure) -> ProfileReport:
    """Coordinate devices joining at `listen`, profile them once all `world_size - 1` are in, close the
    coordinator (devices in retry mode wait for the next one) and return the report."""
    if world_size < 2:
        raise ValueError(f"--world-size {world_size}: profiling a cluster needs at least one device besides rank 0")
    validate_options(replace(options, world_size=world_size))
    model = load_model(options.model, options.checkpoint, seed=seed)
    engine = launch_engine(world_size, options.model, provisional_profile(options.model, model.config, world_size),
                           checkpoint=options.checkpoint, seed=seed, config=PROFILE_CONFIG, bind_addr=listen[0],
                           port=listen[1], local_workers=False, secret_file=secret_file, model_obj=model)
    try:
        say(f"coordinator at {engine.address}: devices join with `edgeprism join {engine.address} --secret-file "
            f"{os.fspath(secret_file)}`")
        wait_for_devices(engine, say, join_timeout_s)
        return profile_cluster(engine, options, say, progress, **measure)
    finally:
        engine.close()
        del engine
        # The store stops serving when its last reference goes; the engine sits in reference cycles (its
        # ticker, its on_close), so collect them now: the next coordinator takes the port at once, and a
        # device that comes back finds no stale store.
        gc.collect()


def profile_for_serving(listen: tuple[str, int], world_size: int, secret_file: str | os.PathLike, model: str,
                        checkpoint: str | None, seed: int, say: Callable[[str], None]) -> Profile:
    """`edgeprism serve --listen` without --profile: profile the devices that join first (saying so), with
    `edgeprism profile`'s defaults; the serving coordinator then starts on the same address with it."""
    say(f"no --profile: profiling the cluster of {world_size} ranks first (devices join {listen[0]}:{listen[1]})")
    options = ProfileOptions(model=model, world_size=world_size, checkpoint=checkpoint, seed=seed)
    report = profile_at(listen, world_size, secret_file, options, say=say, seed=seed)
    say(f"profiled in {report.profile_seconds:.1f} s: {report.profile}; serving with it (devices join again)")
    return report.profile


def _staging_table(data: dict) -> StagingTable:
    fields = {f.name for f in dataclasses.fields(StagingTable)} - {"samples"}
    return StagingTable(**{k: data[k] for k in fields if k in data},
                        samples=tuple(StagingSample(**s) for s in data.get("samples", ())))


__all__ = [
    "PROFILE_CONFIG",
    "profile_at",
    "profile_cluster",
    "profile_for_serving",
    "provisional_profile",
    "wait_for_devices",
]
