"""Jobs over a joined cluster: a measurement every member runs at once, on the current epoch's lane.

Rank 0 posts `{"op": "job", "epoch", "name", "args"}` to the members (edgeprism.runtime.control) and
runs the same job itself; every member then runs the job's rank function on the lane whose ranks are
the epoch's members (a GLOO group; ranks group-relative), and the results come back to rank 0 through
that group (an all-gather of JSON), never through files:

    results = engine.run_job("link", {"latency_repeats": 20, "bandwidth_target_s": 0.25, "timeout_s": 120})

Over sealed lanes (`--seal-lanes`, edgeprism.comm.sealing) every result crosses sealed with the lane's
key and counter (kind "job"), so a stranger in the path can neither read a device's description nor
forge the measurements the planner will trust: a result that does not open fails the job on every rank
(after an unsealed one-byte verdict keeps the ranks in step) with a `TamperError` naming its sender. The
link test's and compute grid's own payloads are synthetic bytes (no input) and cross as they are.

A job's name picks an entry of `JOBS`, a fixed registry: nothing received is ever run as code, and the
arguments are checked against the entry's schema (`check_job`) on both sides. A job runs in two steps,
each ending in an all-gather: *prepare* (check what this rank has: a meter asked for, a device) and
*run* (only when every rank prepared). A rank whose step raised sends its error instead of a result,
and rank 0 raises `JobError` naming that rank.

Jobs: `compute` — the profile's compute grid timed on every device at once
(`edgeprism.profile.compute_job.run_plan`), plus each device's own staging copies and what it is
(device kind, cores); `link` — the link test (`edgeprism.testbed.linktest.measure_link`) over the lane's
group, through the runtime's own transport and emulated link; `energy` — each device's power per phase
with its own meter (`edgeprism.profile.energy`), or modelled, and the source says which.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Any

import torch
import torch.distributed as dist

from edgeprism.comm.context import DistContext
from edgeprism.comm.exchange import PeerError
from edgeprism.comm.sealing import OVERHEAD_BYTES, LaneSealer, TamperError
from edgeprism.energy.detect import METER_KINDS
from edgeprism.energy.model import get_power_model
from edgeprism.models.base import ReferenceModel
from edgeprism.profile.compute import ProgressFn
from edgeprism.profile.compute_job import run_plan
from edgeprism.profile.energy import measure_energy, one_block
from edgeprism.profile.exchange_cost import exchange_cost_rank
from edgeprism.profile.profiler import host_facts, usable_cores
from edgeprism.profile.staging import measure_staging
from edgeprism.testbed.linktest import measure_link

log = logging.getLogger(__name__)

MAX_RESULT_BYTES = 16 << 20
"""A rank's JSON result (the compute grid's samples of every rank are ~100 KB for a large grid)."""
MAX_GRID_POINTS = 4096
MAX_BATCH = 1024
MAX_TOKENS = 1 << 16
_NUMBER = (int, float)
_SHAPE_KINDS = ("local", "equal-cr1", "equal-max-cr", "uneven")


class JobError(RuntimeError):
    """A job failed on a member (the message names the rank and its error)."""


@dataclass(frozen=True)
class JobContext:
    """What a rank function runs with: the lane's context (group, group-relative rank, device, emulated
    link), the engine's model, and on rank 0 a progress callback."""

    ctx: DistContext
    model: ReferenceModel
    pair: Any = None
    """The lane of the group's ranks 0 and 1 (the link test's one-way part, > 2 ranks); None elsewhere."""
    progress: ProgressFn | None = None
    sealer: LaneSealer | None = None
    """The lane's sealer when its messages are sealed: the job's results cross sealed (kind "job")."""


@dataclass(frozen=True)
class Job:
    """A registry entry: its arguments (name → JSON type), a check of their values, and `prepare`, which
    returns the rank function's second step."""

    name: str
    args: Mapping[str, type | tuple[type, ...]]
    check: Callable[[dict], None]
    prepare: Callable[[JobContext, dict], Callable[[], dict]]
    doc: str


# --- arguments ---
def _within(args: dict, name: str, low: float, high: float) -> None:
    if not low <= args[name] <= high:
        raise ValueError(f"{name} {args[name]!r} is outside {low:g}..{high:g}")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_compute(args: dict) -> None:
    _within(args, "warmup", 0, 100)
    _within(args, "repeats", 1, 100)
    shapes, overhead = args["shapes"], args["overhead"]
    if not 1 <= len(shapes) <= MAX_GRID_POINTS or len(overhead) > MAX_GRID_POINTS:
        raise ValueError(f"{len(shapes)} grid shapes and {len(overhead)} overhead points: give 1..{MAX_GRID_POINTS}")
    for shape in shapes:
        if not (isinstance(shape, list) and len(shape) == 4 and all(_whole(v) for v in shape[:3])
                and shape[3] in _SHAPE_KINDS and 1 <= shape[0] <= MAX_BATCH
                and 1 <= shape[1] <= shape[2] <= MAX_TOKENS):
            raise ValueError(f"grid shape {str(shape)[:80]} is not [batch, own tokens <= kv vectors, kv vectors, "
                             f"kind] with batch <= {MAX_BATCH}, tokens <= {MAX_TOKENS}, kind in {_SHAPE_KINDS}")
    for point in overhead:
        if not (isinstance(point, list) and len(point) == 2 and all(_whole(v) for v in point)
                and 1 <= point[0] <= MAX_BATCH and 1 <= point[1] <= MAX_TOKENS):
            raise ValueError(f"overhead point {str(point)[:80]} is not [batch, tokens] within bounds")


def _check_link(args: dict) -> None:
    _within(args, "latency_repeats", 1, 1000)
    _within(args, "bandwidth_target_s", 1e-3, 10.0)


def _check_energy(args: dict) -> None:
    if args["meter"] not in METER_KINDS:
        raise ValueError(f"meter {args['meter']!r}: choose one of {', '.join(METER_KINDS)}")
    if args["power_model"]:
        get_power_model(args["power_model"])  # unknown: ValueError listing the known ones
    _within(args, "num_tokens", 1, MAX_TOKENS)
    _within(args, "window_s", 0.01, 10.0)


# --- rank functions ---
def describe_device(device: torch.device) -> dict[str, Any]:
    """What this rank is, as the profile records it (`DeviceDescription`): never the host name itself."""
    facts = host_facts(device, usable_cores())
    return {"device": str(device), "device_kind": facts.device_kind, "num_cores": facts.num_cores,
            "host_id": facts.host_id, "cpu_model": facts.cpu_model}


def _compute(job: JobContext, args: dict) -> Callable[[], dict]:
    ctx = job.ctx
    plan = {"shapes": args["shapes"], "overhead": args["overhead"], "warmup": args["warmup"],
            "repeats": args["repeats"]}

    def run() -> dict:
        raw = run_plan(plan, ctx.group_rank, ctx.world_size, ctx.device, group=ctx.group, model=job.model,
                       progress=job.progress)
        staging = measure_staging(ctx.device)
        return {"compute": raw, "device": describe_device(ctx.device),
                "staging": {**staging.to_dict(), "table": dataclasses.asdict(staging.table)}}

    return run


def _link(job: JobContext, args: dict) -> Callable[[], dict]:
    ctx = job.ctx
    if ctx.world_size > 2 and ctx.group_rank < 2 and job.pair is None:
        raise ValueError(f"the link test over {ctx.world_size} ranks needs a lane of the group's ranks 0 and 1")

    def run() -> dict:
        found = measure_link(ctx.group, ctx.link, pair=job.pair, latency_repeats=args["latency_repeats"],
                             bandwidth_target_s=args["bandwidth_target_s"])
        return {"link": found.to_json()} if ctx.group_rank == 0 else {}

    return run


def _check_exchange_cost(args: dict) -> None:
    _within(args, "nbytes", 1, MAX_RESULT_BYTES)
    _within(args, "width", 1, MAX_TOKENS)
    _within(args, "rounds", 1, 20)
    _within(args, "workload_s", 0.05, 30.0)


def _exchange_cost(job: JobContext, args: dict) -> Callable[[], dict]:
    def run() -> dict:
        raw = exchange_cost_rank(job.ctx, {key: args[key] for key in ("nbytes", "width", "rounds", "workload_s")})
        return {"exchange_cost": raw} if job.ctx.group_rank == 0 else {}

    return run


def _energy(job: JobContext, args: dict) -> Callable[[], dict]:
    device = job.ctx.device
    body = one_block(job.model, args["num_tokens"], device)

    def run() -> dict:
        energy = measure_energy(body, device, meter_kind=args["meter"], power_model=args["power_model"] or None,
                                window_s=args["window_s"])
        return {"energy": dataclasses.asdict(energy)}

    return run


JOBS: Mapping[str, Job] = MappingProxyType({
    "compute": Job("compute", {"shapes": list, "overhead": list, "warmup": int, "repeats": int,
                               "timeout_s": _NUMBER}, _check_compute, _compute,
                   "the compute grid on every device at once, each device's staging and description"),
    "link": Job("link", {"latency_repeats": int, "bandwidth_target_s": _NUMBER, "timeout_s": _NUMBER},
                _check_link, _link, "the link test over the lane's group"),
    "exchange_cost": Job("exchange_cost", {"nbytes": int, "width": int, "rounds": int, "workload_s": _NUMBER,
                                           "timeout_s": _NUMBER}, _check_exchange_cost, _exchange_cost,
                         "the compute each device loses to a background all-gather, per byte"),
    "energy": Job("energy", {"meter": str, "power_model": str, "num_tokens": int, "window_s": _NUMBER,
                             "timeout_s": _NUMBER}, _check_energy, _energy,
                  "each device's power per phase with its own meter"),
})
"""Every job a member runs on rank 0's word; nothing else can be run."""


def check_job(name: object, args: object) -> Job:
    """The registry entry for `name` when `args` are exactly its arguments, of their types and bounds;
    ValueError otherwise (the control channel turns it into a ControlError)."""
    if not isinstance(name, str) or name not in JOBS:
        raise ValueError(f"unknown job {str(name)[:40]!r}; known: {', '.join(JOBS)}")
    job = JOBS[name]
    if not isinstance(args, dict):
        raise ValueError(f"job {name!r}: args must be an object, got {type(args).__name__}")
    extra, missing = set(args) - set(job.args), set(job.args) - set(args)
    if extra or missing:
        raise ValueError(f"job {name!r}: missing args {sorted(missing)}, unexpected {sorted(extra)[:5]}")
    for key, kind in job.args.items():
        value = args[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"job {name!r}: {key} must be {getattr(kind, '__name__', 'a number')}, "
                             f"got {type(value).__name__}")
    _within(args, "timeout_s", 1.0, 7 * 24 * 3600.0)
    try:
        job.check(args)
    except ValueError as err:
        raise ValueError(f"job {name!r}: {err}") from None
    return job


def lane_job_context(lanes: Mapping, members: tuple[int, ...], model: ReferenceModel,
                     progress: ProgressFn | None = None) -> JobContext | None:
    """This rank's job context on the lane over `members` (None when there is none, or we are not in it)."""
    lane = lanes.get(tuple(members))
    if lane is None or lane.ctx is None:
        return None
    pair_lane = lanes.get(tuple(members[:2])) if len(members) > 2 else None
    pair = pair_lane.ctx.group if pair_lane is not None and pair_lane.ctx is not None else None
    sealer = lane.exchanger.sealer if lane.exchanger is not None else None
    return JobContext(lane.ctx, model, pair, progress, sealer)


def all_gather_json(ctx: DistContext, value: Any, sealer: LaneSealer | None = None) -> list[Any]:
    """Collective over `ctx.group`: every rank's JSON value, in group-rank order. With `sealer`, each value
    crosses sealed; TamperError (on the rank that caught it) or PeerError (on the others) when one did not open."""
    body = json.dumps(value, separators=(",", ":")).encode()
    if len(body) > MAX_RESULT_BYTES:
        body = json.dumps({"error": f"result of {len(body)} bytes exceeds {MAX_RESULT_BYTES}"}).encode()
    if sealer is None:
        return [json.loads(b) for b in _all_gather_bytes(ctx, body)]
    own = ctx.group_rank
    sealed = sealer.seal(torch.frombuffer(bytearray(body), dtype=torch.uint8), "job").numpy().tobytes()
    values: list[Any] = []
    caught: TamperError | None = None
    for src, blob in enumerate(_all_gather_bytes(ctx, sealed)):
        if src == own:
            values.append(json.loads(body))
            continue
        try:
            values.append(json.loads(sealer.open(torch.frombuffer(bytearray(blob), dtype=torch.uint8), src, "job")
                                     .numpy().tobytes()))
        except TamperError as err:
            caught = caught or err
            values.append(None)
    # Every rank learns whether any rank caught one, so that all leave the job together (not one per timeout).
    flags = [torch.zeros(1, dtype=torch.uint8) for _ in range(ctx.world_size)]
    dist.all_gather(flags, torch.tensor([int(caught is not None)], dtype=torch.uint8), group=ctx.group)
    if caught is not None:
        raise caught
    reporters = [rank for rank, flag in enumerate(flags) if flag.item()]
    if reporters:
        raise PeerError(f"lane ranks {reporters} could not open a sealed job result (tampered on the way)")
    return values


def _all_gather_bytes(ctx: DistContext, body: bytes) -> list[bytes]:
    """Collective over `ctx.group`: every rank's bytes (1..MAX_RESULT_BYTES + a seal), in group-rank order."""
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(ctx.world_size)]
    dist.all_gather(lengths, torch.tensor([len(body)], dtype=torch.int64), group=ctx.group)
    sizes = [int(t.item()) for t in lengths]
    if not all(0 < n <= MAX_RESULT_BYTES + OVERHEAD_BYTES for n in sizes):
        raise JobError(f"ranks sent results of {sizes} bytes; each must be 1..{MAX_RESULT_BYTES + OVERHEAD_BYTES}")
    padded = torch.zeros(max(sizes), dtype=torch.uint8)
    padded[:len(body)] = torch.frombuffer(bytearray(body), dtype=torch.uint8)
    gathered = [torch.empty(max(sizes), dtype=torch.uint8) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, padded, group=ctx.group)
    return [bytes(t[:n].numpy()) for t, n in zip(gathered, sizes)]


def _step(body: Callable[[], Any], group_rank: int) -> tuple[Any, dict]:
    """(value, outcome to send): the step's error is sent to rank 0, which raises it naming this rank."""
    try:
        value = body()
        return value, {"ok": value if isinstance(value, dict) else True}
    except Exception as err:
        log.warning("lane rank %d: job step failed: %s: %s", group_rank, type(err).__name__, err)
        return None, {"error": f"{type(err).__name__}: {err}"}


def run_job_here(job_ctx: JobContext, name: str, args: dict, ranks: tuple[int, ...]) -> list[dict] | None:
    """This rank's part of job `name` (collective over the lane; `ranks` are the lane's engine ranks).
    Rank 0: every rank's result, in lane order; JobError naming the first rank that failed. Others: None."""
    job = check_job(name, args)
    ctx = job_ctx.ctx
    ctx.group.set_timeout(timedelta(seconds=float(args["timeout_s"])))  # compute: others wait while rank 0 runs alone
    try:
        run, ready = _step(lambda: job.prepare(job_ctx, args), ctx.group_rank)
        readies = all_gather_json(ctx, {"error": ready["error"]} if "error" in ready else {"ok": True},
                                  job_ctx.sealer)
        outcomes = readies
        if not any("error" in r for r in readies):
            _, result = _step(run, ctx.group_rank)
            outcomes = all_gather_json(ctx, result, job_ctx.sealer)
    finally:
        ctx.group.set_timeout(timedelta(seconds=ctx.timeout_s))
    if not ctx.is_root:
        return None
    for rank, outcome in zip(ranks, outcomes):
        if "error" in outcome:
            raise JobError(f"job {name!r} failed on rank {rank}: {outcome['error']}")
    return [outcome["ok"] for outcome in outcomes]


__all__ = [
    "JOBS",
    "MAX_RESULT_BYTES",
    "Job",
    "JobContext",
    "JobError",
    "all_gather_json",
    "check_job",
    "describe_device",
    "lane_job_context",
    "run_job_here",
]
