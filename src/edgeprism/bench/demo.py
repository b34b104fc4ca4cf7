"""The demo: a mixed workload over emulated devices, static strategies against the adaptive engine.

One run, interleaved (machines here are shared and noisy): for each link phase and batch size, the
same request is served by every strategy in turn — `local` (one device), `full_exchange` (static
CR = 1, fp32), `segment_means` (a static Segment Means codec) and `adaptive` (the engine's own plan).
The `oracle` is derived afterwards: per (phase, batch) the best static strategy in hindsight among those
measured within the fidelity budget. Between
phases the link changes (the testbed reshapes it), and the adaptive plan must follow.

Devices of different speeds or counts (`speeds`, CPU quotas on the testbed; the fastest is rank 0) add
`equal_split`, `world:k` for every group size between one device and all, optionally `split:a/b/...` share
sweeps, and `fast_alone` (`bench.demo_devices`): the oracle is then the best over every world size and the
measured shares. With devices, every plan but the Segment Means baseline sends every token (faithful codecs).

Rank 0 of a `torchrun` job (one rank per testbed host) runs `drive`; the other ranks serve.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

from edgeprism.bench.demo_data import DemoData
from edgeprism.bench.demo_devices import codec_class, device_codecs, device_plan, share_sweep, world_sizes
from edgeprism.bench.limits import limit_fields, plan_label
from edgeprism.bench.order import round_order
from edgeprism.bench.tables import percentile
from edgeprism.comm.context import DistContext
from edgeprism.compress.registry import get_codec, num_vectors
from edgeprism.plan import Request, static_plan
from edgeprism.plan.types import DEFAULT_MAX_FIDELITY_LOSS, Limits
from edgeprism.runtime.engine import Engine, EngineConfig

log = logging.getLogger(__name__)

STATIC = ("local", "full_exchange", "segment_means")
STRATEGIES = (*STATIC, "adaptive")
ORDER = ("local", "fast_alone", "full_exchange", "segment_means", "equal_split", "adaptive", "oracle")


@dataclass(frozen=True)
class DemoSpec:
    model: str = "vit-base-patch16-224"
    profile: str = ""
    checkpoint: str = ""
    """The model's weights ("": seeded random weights)."""
    data: str = "synthetic"
    """What is served (`bench.demo_data`): "fashion-mnist" real images scored by a probe, or "synthetic"."""
    image_size: int | None = None
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    links: tuple[str, ...] = ("wifi4", "congested")
    """Link preset per phase; the testbed switches between phases."""
    segment_means_codec: str = "sm16"
    objective: str = "latency"
    max_fidelity_loss: float | None = DEFAULT_MAX_FIDELITY_LOSS
    allow_unmeasured_codecs: bool = False
    """The adaptive engine may use codecs of unmeasured fidelity (explicit opt-in; rows then say so)."""
    repeats: int = 3
    """Rounds per (phase, batch): every strategy serves each round's images once, in an order drawn per round."""
    full_exchange_phases: int = 1
    """Static full exchange runs in this many leading phases only: on a sagging link it takes minutes per
    request and is never the best choice, so later phases compare local, Segment Means and adaptive."""
    rows_file: str = ""
    control_dir: str = ""
    """Rank 0 writes `phase-N.request` here and waits for `phase-N.ack` from the driver (link changed)."""
    seed: int = 0
    speeds: tuple[float, ...] = ()
    """CPU quota per device in cores (rank order, fastest first); empty: whole cores, no mixed strategies."""
    share_step: float = 0.0
    """> 0: also measure every split in share steps of this size (`split:` strategies, for the oracle)."""
    codecs: tuple[str, ...] = ()
    """Plan only with these of the profile's codecs (`Limits.codecs`); empty: with `speeds` the codecs that send
    every token (no Segment Means, `bench.demo_devices.device_codecs`), else any (under the fidelity rules)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DemoSpec:
        data = json.loads(text)
        data["batches"] = tuple(data["batches"])
        data["links"] = tuple(data["links"])
        data["speeds"] = tuple(data.get("speeds", ()))
        data["codecs"] = tuple(data.get("codecs", ()))
        return cls(**data)


def wait_for_link_change(spec: DemoSpec, phase: int, timeout_s: float = 120.0) -> None:
    request = os.path.join(spec.control_dir, f"phase-{phase}.request")
    ack = os.path.join(spec.control_dir, f"phase-{phase}.ack")
    with open(request, "w") as handle:
        handle.write(spec.links[phase])
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(ack):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the driver did not change the link to {spec.links[phase]} within {timeout_s} s")
        time.sleep(0.05)


def demo_rank(ctx: DistContext, args: dict, progress=None) -> None:
    """Rank function (`edgeprism.comm.job`) of the demo job: `args["spec"]` is a DemoSpec's JSON; rank 0
    drives (rows go to the spec's rows_file, which the driver follows while it changes the link), the
    others serve."""
    spec = DemoSpec.from_json(args["spec"])
    config = EngineConfig(objective=spec.objective, max_fidelity_loss=spec.max_fidelity_loss,
                          allow_unmeasured_codecs=spec.allow_unmeasured_codecs, max_batch=max(spec.batches),
                          probe_every=0)
    engine = Engine.from_profile(spec.model, spec.profile, checkpoint=spec.checkpoint or None, seed=spec.seed,
                                 ctx=ctx, config=config)
    if ctx.is_root:
        drive(engine, spec)
        engine.close()
    else:
        engine.serve_workers()


def drive(engine, spec: DemoSpec, progress=None) -> list[dict]:
    """Rank 0: serve the workload with every strategy; append one JSON row per request to rows_file."""
    rows = []
    config = engine.model.config
    limits = Limits(spec.max_fidelity_loss, None, spec.allow_unmeasured_codecs,
                    device_codecs(engine.profile, spec.codecs, spec.speeds))
    total = sum(len(phase_strategies(spec, p)) for p in range(len(spec.links))) * len(spec.batches) * spec.repeats
    done = offset = 0
    data = DemoData(spec.data, engine.model, spec.image_size, spec.seed)
    # Warm-up, not recorded: every plan shape once (first calls pay one-off allocation and set-up).
    warm_inputs, _ = data.batch(min(spec.batches), 0)
    warm_request = Request(config.name, min(spec.batches), engine.model.validate_input(warm_inputs))
    for mode, codec in (("local", None), ("distributed", "fp32"), ("distributed", spec.segment_means_codec)):
        engine.infer(warm_inputs, plan=static_plan(engine.profile, warm_request, engine.link_estimate, mode, codec))
    engine.infer(warm_inputs, objective=spec.objective, limits=limits)
    with open(spec.rows_file, "a") as out:
        for phase, link_name in enumerate(spec.links):
            if phase > 0:
                wait_for_link_change(spec, phase)
            for batch in spec.batches:
                request = None
                for repeat in range(spec.repeats):
                    inputs, labels = data.batch(batch, offset)  # new images per round, the same for every strategy
                    offset += batch
                    request = request or engine.request_of(inputs, engine.model.validate_input(inputs))
                    strategies = phase_strategies(spec, phase)
                    for strategy in round_order(strategies, repeat):  # interleaved, a new order per round
                        link = engine.link_estimate
                        plan = None
                        if strategy == "local":
                            plan = static_plan(engine.profile, request, link, "local")
                        elif strategy == "full_exchange":
                            plan = static_plan(engine.profile, request, link, "distributed", "fp32")
                        elif strategy == "segment_means":
                            plan = static_plan(engine.profile, request, link, "distributed",
                                               spec.segment_means_codec)
                        elif strategy == "equal_split" or strategy.startswith(("split:", "world:")):
                            plan = device_plan(engine.profile, request, link, strategy, spec.objective, limits)
                            if plan is None:
                                continue  # no codec admitted over that group
                        result = engine.infer(inputs, objective=spec.objective, limits=limits, plan=plan)
                        m = result.metrics
                        row = {"phase": phase, "link": link_name, "batch": batch, "repeat": repeat,
                               "strategy": strategy, "latency_s": m.latency_s, "energy_j": m.energy_j,
                               "energy_source": m.energy_source, "predicted_latency_s": m.predicted_latency_s,
                               "predicted_energy_j": m.predicted_energy_j, "mode": m.mode,
                               "codec": m.plan.get("codec") or "", "plan": plan_label(m.plan),
                               "bytes_exchanged": m.bytes_exchanged, "fidelity_loss": m.fidelity_loss,
                               "codec_class": codec_class(m.plan, m.fidelity_loss, spec.max_fidelity_loss),
                               "world_size": len(m.plan.get("ranks", [0])),
                               "staging_s": m.staging_s,
                               "collective_s": m.collective_s, "compute_s": m.compute_s, "cpu_s": m.cpu_s,
                               "link_bandwidth_bps": m.link_bandwidth_bps, "link_latency_s": m.link_latency_s,
                               "request_id": m.request_id, "time_s": time.time(), "data": spec.data,
                               "probe_correct": data.correct(result.outputs, labels),
                               "probe_total": None if labels is None else len(labels),
                               "timeline": m.timeline,
                               **limit_fields(engine.profile, request, m.plan, link, m.latency_s)}
                        rows.append(row)
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                        done += 1
                        if progress:
                            progress(f"[{done}/{total}] {link_name} batch {batch:>2} {strategy:<13} "
                                     f"{m.latency_s * 1e3:9.1f} ms  {row['plan']}")
    return rows


def phase_strategies(spec: DemoSpec, phase: int) -> tuple[str, ...]:
    strategies = STRATEGIES if phase < spec.full_exchange_phases else tuple(
        s for s in STRATEGIES if s != "full_exchange")
    if spec.speeds:
        strategies = (*strategies, "equal_split", *world_sizes(len(spec.speeds)),
                      *share_sweep(len(spec.speeds), spec.share_step))
    return strategies


def _is_static(strategy: str) -> bool:
    return strategy in STATIC or strategy == "equal_split" or strategy.startswith(("split:", "world:"))


def _admitted(rows: list[dict], max_fidelity_loss: float | None, allow_unmeasured_codecs: bool,
              codecs: tuple[str, ...] | None) -> bool:
    """Every row's answer is one the adaptive plan may give: lossless, measured within the budget, or (opted in)
    of unmeasured fidelity with a codec the adaptive plan may use (`codecs`; None: any)."""
    for row in rows:
        loss = row.get("fidelity_loss", 0.0)
        if loss == 0.0:
            continue
        if loss is None and not allow_unmeasured_codecs:
            return False
        if loss is not None and max_fidelity_loss is not None and loss > max_fidelity_loss:
            return False
        if codecs is not None and row.get("codec") not in codecs:
            return False
    return True


def every_token_codecs(rows: list[dict]) -> tuple[str, ...]:
    """The rows' codecs that send every token (no Segment Means): what the adaptive plan may use with devices
    when no codec list was given (`bench.demo_devices.device_codecs`)."""
    return tuple(sorted({c for c in (r.get("codec") for r in rows) if c and num_vectors(get_codec(c), 64) == 64}))


def add_oracle(rows: list[dict], max_fidelity_loss: float | None = DEFAULT_MAX_FIDELITY_LOSS,
               allow_unmeasured_codecs: bool = False, codecs: tuple[str, ...] | None = None) -> list[dict]:
    """Per (phase, batch): the best static strategy in hindsight (median latency over repeats) among those whose
    answers the adaptive plan was allowed to give — measured within the fidelity budget, or, when the run opted
    in to codecs of unmeasured fidelity, with such a codec among `codecs` (the adaptive plan's allow-list; None:
    any). The adaptive plan is held to those rules, so is the oracle (a Segment Means baseline it could not pick
    is shown, but is no target)."""
    out = list(rows)
    keys = sorted({(r["phase"], r["link"], r["batch"]) for r in rows})
    for phase, _link, batch in keys:
        best = None
        for strategy in sorted({r["strategy"] for r in rows if _is_static(r["strategy"])}):
            mine = [r for r in rows if (r["phase"], r["batch"], r["strategy"]) == (phase, batch, strategy)]
            if not mine or not _admitted(mine, max_fidelity_loss, allow_unmeasured_codecs, codecs):
                continue
            median = sorted(mine, key=lambda r: r["latency_s"])[len(mine) // 2]
            if best is None or median["latency_s"] < best["latency_s"]:
                best = median
        if best is not None:
            out.append({**best, "strategy": "oracle", "plan": f"{best['strategy']} ({best['plan']})"})
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (phase, batch, strategy): median latency and energy over repeats."""
    table = []
    for key in sorted({(r["phase"], r["link"], r["batch"], r["strategy"]) for r in rows},
                      key=lambda k: (k[0], k[2], ORDER.index(k[3]) if k[3] in ORDER else len(ORDER), k[3])):
        mine = sorted((r for r in rows if (r["phase"], r["link"], r["batch"], r["strategy"]) == key),
                      key=lambda r: r["latency_s"])
        median = mine[len(mine) // 2]
        scored = [r for r in mine if r.get("probe_correct") is not None]
        latencies = [r["latency_s"] for r in mine]  # sorted
        table.append({"latency_p25_s": percentile(latencies, 0.25), "latency_p75_s": percentile(latencies, 0.75),
                      "n": len(latencies),
                      "probe_accuracy": (sum(r["probe_correct"] for r in scored) / sum(r["probe_total"] for r in scored)
                                         if scored else None),
                      "phase": key[0], "link": key[1], "batch": key[2], "strategy": key[3],
                      "latency_s": median["latency_s"], "energy_j": median["energy_j"],
                      "energy_source": median["energy_source"], "plan": median["plan"],
                      "predicted_latency_s": median["predicted_latency_s"],
                      "fidelity_loss": median.get("fidelity_loss", 0.0), "codec_class": median.get("codec_class"),
                      "world_size": median.get("world_size"),
                      "limit_s": median.get("limit_s"), "achieved_over_limit": median.get("achieved_over_limit"),
                      "compute_to_comm": median.get("compute_to_comm")})
    return table


def accuracy_by_strategy(rows: list[dict]) -> dict[str, float]:
    """Per strategy over every scored row of the run: the share of images the probe labelled correctly."""
    out = {}
    for strategy in sorted({r["strategy"] for r in rows if r.get("probe_correct") is not None}):
        mine = [r for r in rows if r["strategy"] == strategy and r.get("probe_correct") is not None]
        out[strategy] = sum(r["probe_correct"] for r in mine) / sum(r["probe_total"] for r in mine)
    return out


def ratios(table: list[dict]) -> list[dict]:
    """Per (phase, batch): adaptive vs full exchange (latency and energy reduction) and vs the oracle."""
    out = []
    for phase, link, batch in sorted({(r["phase"], r["link"], r["batch"]) for r in table}):
        get = {r["strategy"]: r for r in table if (r["phase"], r["batch"]) == (phase, batch)}
        if not {"adaptive", "oracle", "local"} <= set(get):
            continue
        a, f, o, loc = get["adaptive"], get.get("full_exchange"), get["oracle"], get["local"]
        out.append({"phase": phase, "link": link, "batch": batch,
                    "latency_reduction_vs_full": 1 - a["latency_s"] / f["latency_s"] if f else None,
                    "energy_reduction_vs_full": 1 - a["energy_j"] / f["energy_j"] if f else None,
                    "adaptive_over_oracle": a["latency_s"] / o["latency_s"],
                    "adaptive_over_local": a["latency_s"] / loc["latency_s"],
                    **({"adaptive_over_equal_split": a["latency_s"] / get["equal_split"]["latency_s"]}
                       if "equal_split" in get else {}),
                    **({"adaptive_over_fast_alone": a["latency_s"] / get["fast_alone"]["latency_s"]}
                       if "fast_alone" in get else {}),
                    "adaptive_plan": a["plan"], "adaptive_codec_class": a.get("codec_class"),
                    "oracle_plan": o["plan"], "oracle_world_size": o.get("world_size")})
    return out


@dataclass
class DemoReport:
    rows: list[dict] = field(default_factory=list)
    table: list[dict] = field(default_factory=list)
    ratios: list[dict] = field(default_factory=list)
