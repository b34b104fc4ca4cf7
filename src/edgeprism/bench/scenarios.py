"""Benchmark scenarios as data: a TOML file → a frozen `Scenario` → the jobs a run executes.

    name = "smoke"
    models = [{ name = "vit-tiny-test" }, { name = "bert-base", seq_len = 128 }]
    links = ["wifi4"]
    world_sizes = [2]
    batches = [1, 2]
    strategies = ["local", "transformers", "full_exchange", "segment_means", "pipeline",
                  "tensor_parallel", "adaptive"]
    segment_means_codecs = ["sm4"]
    repeats = 3
    profile = "synthetic"       # or "measure" (cached per model, world size, link and emulation)
    device_speeds = [[1.0, 0.4], [0.5, 0.5, 0.5, 0.5]]   # optional: devices of these CPU quotas (cores,
                                # fastest first; testbed cgroups) instead of world_sizes of whole cores

A *job* is one (model case, world size, link): one testbed, one profile, one torchrun job in which
every strategy serves every batch, interleaved request by request (see `bench.ranks`).
Metrics are defined once in docs/METHODOLOGY.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from edgeprism.plan.types import DEFAULT_MAX_FIDELITY_LOSS

ENGINE_STRATEGIES = ("local", "full_exchange", "segment_means", "equal_split", "adaptive")
"""Served by edgeprism's engine (static plans or its own)."""
PEER_STRATEGIES = ("transformers", "pipeline", "tensor_parallel")
"""The other ways to run the model: plain transformers on one device, and two multi-device peers."""
STRATEGIES = ("local", "transformers", "full_exchange", "segment_means", "equal_split", "pipeline", "tensor_parallel",
              "adaptive")
"""`equal_split`: the adaptive plan's codec over every device with equal token shares (mixed devices)."""


@dataclass(frozen=True)
class ModelCase:
    """One model at one input size: `seq_len` tokens for text models, the native image for ViT."""

    name: str
    """A preset name or a local checkpoint folder."""
    seq_len: int | None = None

    @property
    def label(self) -> str:
        name = os.path.basename(os.path.normpath(self.name))  # a folder: its own name (labels name files)
        return name if self.seq_len is None else f"{name}@{self.seq_len}"


@dataclass(frozen=True)
class Job:
    """What one torchrun job measures (one testbed, one profile)."""

    scenario: str
    model: ModelCase
    world_size: int
    link: str
    batches: tuple[int, ...]
    strategies: tuple[str, ...]
    """Expanded: `segment_means` becomes one `segment_means:<codec>` per codec."""
    repeats: int
    warmup: int
    seed: int
    skip_slower_than_s: float
    max_fidelity_loss: float | None = DEFAULT_MAX_FIDELITY_LOSS
    speeds: tuple[float, ...] = ()
    """CPU quota per device in cores (testbed cgroups); empty: whole cores."""
    allow_unmeasured_codecs: bool = False
    codecs: tuple[str, ...] = ()
    adaptive_codecs: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        devices = f"x{self.world_size}" if not self.speeds else "[" + ",".join(f"{s:g}" for s in self.speeds) + "]"
        return f"{self.model.label} {devices} {self.link}"


@dataclass(frozen=True)
class Scenario:
    name: str
    models: tuple[ModelCase, ...]
    links: tuple[str, ...]
    world_sizes: tuple[int, ...] = (2,)
    batches: tuple[int, ...] = (1, 8, 32)
    strategies: tuple[str, ...] = STRATEGIES
    segment_means_codecs: tuple[str, ...] = ("sm4", "sm16")
    """The static Segment Means strategies, one per codec (fixed CRs)."""
    repeats: int = 3
    """Timed requests per (point, strategy); tables report their median and spread."""
    warmup: int = 1
    """Untimed requests per (point, strategy) before the timed ones (first calls pay set-up)."""
    profile: Literal["measure", "synthetic"] = "measure"
    backend: Literal["auto", "netns", "loopback"] = "auto"
    seed: int = 0
    skip_slower_than_s: float = 120.0
    """A multi-device strategy whose wire time alone (bytes / link rate) exceeds this is not run; its row
    says `skipped` and carries that lower bound as `latency_lower_bound_s`."""
    max_fidelity_loss: float | None = DEFAULT_MAX_FIDELITY_LOSS
    """The adaptive engine's fidelity budget (EngineConfig.max_fidelity_loss; default 1 %; None: any measured
    loss). Static strategies ignore it; every row's `fidelity_loss` and `max_abs_diff_vs_local` show what
    each plan lost."""
    allow_unmeasured_codecs: bool = False
    """Opt in: the adaptive engine may use codecs whose fidelity for this model was never measured (random
    weights: speed only). Rows of such plans say `fidelity_loss` null."""
    codecs: tuple[str, ...] = ()
    """Codecs the measured profile records, hence all the adaptive engine may choose from (empty: the
    standard family); the static strategies' codecs must be among them."""
    adaptive_codecs: tuple[str, ...] = ()
    """The adaptive engine plans only with these (EngineConfig.codecs; empty: any the profile has): e.g. the
    quantising family measured faithful on the real-weights models, while Segment Means stays a baseline."""
    device_speeds: tuple[tuple[float, ...], ...] = ()
    """Mixed devices: one job per entry, its devices' CPU quotas in cores, fastest first (replaces
    `world_sizes`; the testbed limits each host with a cgroup, `testbed.cpu`)."""
    expected_minutes: float | None = None
    """Documentation: how long the whole scenario took on this project's machine."""
    description: str = ""

    def __post_init__(self) -> None:
        from edgeprism.models.loading import model_config
        from edgeprism.testbed.presets import get_preset

        if not self.models or not self.links:
            raise ValueError(f"scenario {self.name!r} needs at least one model and one link")
        for case in self.models:
            config = model_config(case.name)
            text = config.modality != "image"
            if text and case.seq_len is not None and not 1 <= case.seq_len <= config.max_positions:
                raise ValueError(f"{case.name}: seq_len {case.seq_len} must be in 1..{config.max_positions}")
            if config.modality == "image" and case.seq_len is not None:
                raise ValueError(f"{case.name} is an image model: give no seq_len (it uses its native image)")
        for link in self.links:
            get_preset(link)
        for speeds in self.device_speeds:
            if len(speeds) < 2 or speeds[0] != max(speeds) or min(speeds) <= 0:
                raise ValueError(f"device_speeds entry {list(speeds)}: give >= 2 quotas > 0, the fastest first")
        if any(w < 2 for w in self.world_sizes):
            raise ValueError(f"world_sizes {list(self.world_sizes)} must all be >= 2")
        if not self.batches or any(b < 1 for b in self.batches):
            raise ValueError(f"batches {list(self.batches)} must be >= 1")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise ValueError(f"unknown strategies {unknown}; known: {', '.join(STRATEGIES)}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"repeats {self.repeats} must be >= 1 and warmup {self.warmup} >= 0")
        if self.profile not in ("measure", "synthetic"):
            raise ValueError(f"profile {self.profile!r}: choose 'measure' or 'synthetic'")
        if self.max_fidelity_loss is not None and not 0 <= self.max_fidelity_loss <= 1:
            raise ValueError(f"max_fidelity_loss {self.max_fidelity_loss} must be in 0..1 (a normalised loss)")
        if "segment_means" in self.strategies and not self.segment_means_codecs:
            raise ValueError("strategy segment_means needs segment_means_codecs, e.g. [\"sm4\", \"sm16\"]")

    def expanded_strategies(self) -> tuple[str, ...]:
        out: list[str] = []
        for strategy in self.strategies:
            if strategy == "segment_means":
                out.extend(f"segment_means:{codec}" for codec in self.segment_means_codecs)
            else:
                out.append(strategy)
        return tuple(out)

    def jobs(self) -> list[Job]:
        """One job per (model case, world size, link), in that nesting order."""
        devices = [tuple(s) for s in self.device_speeds] or [(1.0,) * w for w in self.world_sizes]
        return [Job(self.name, case, len(speeds), link, tuple(self.batches), self.expanded_strategies(), self.repeats,
                    self.warmup, self.seed, self.skip_slower_than_s, self.max_fidelity_loss,
                    speeds if self.device_speeds else (), self.allow_unmeasured_codecs, tuple(self.codecs),
                    tuple(self.adaptive_codecs))
                for case in self.models for speeds in devices for link in self.links]

    def to_dict(self) -> dict:
        return asdict(self)


def scenario_from_dict(data: dict, default_name: str = "scenario") -> Scenario:
    known = {f for f in Scenario.__dataclass_fields__}
    extra = sorted(set(data) - known)
    if extra:
        raise ValueError(f"unknown scenario keys {extra}; known: {', '.join(sorted(known))}")
    data = dict(data)
    models = []
    for entry in data.pop("models", ()):
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        bad = sorted(set(entry) - {"name", "seq_len"})
        if bad:
            raise ValueError(f"model entry {entry}: unknown keys {bad} (give name and, for text, seq_len)")
        models.append(ModelCase(str(entry["name"]), entry.get("seq_len")))
    tuples = {k: tuple(v) for k, v in data.items()
              if k in ("links", "world_sizes", "batches", "strategies", "segment_means_codecs", "codecs",
                      "adaptive_codecs")}
    data.update(tuples)
    if "device_speeds" in data:
        data["device_speeds"] = tuple(tuple(float(s) for s in entry) for entry in data["device_speeds"])
    data.setdefault("name", default_name)
    return Scenario(models=tuple(models), **data)


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario TOML file; ValueError naming the file for anything malformed."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"scenario file {path} does not exist (see benchmarks/*.toml)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"scenario {path}: not valid TOML: {err}") from None
    try:
        return scenario_from_dict(data, default_name=path.stem)
    except (TypeError, KeyError) as err:
        raise ValueError(f"scenario {path}: {err}") from None


@dataclass(frozen=True)
class JobSpec:
    """What the job of one `Job` needs (passed to every rank as JSON); its rows come back as progress lines."""

    job: Job
    profile: str
    facts: dict = field(default_factory=dict)
    """Row fields fixed for the whole job: emulation, git SHA, versions, host facts, profile hash."""
    link_rate_bps: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict) -> JobSpec:
        data = json.loads(json.dumps(data))  # a copy: the nested dicts become dataclasses below
        job = data["job"]
        job["model"] = ModelCase(**job["model"])
        job["batches"] = tuple(job["batches"])
        job["strategies"] = tuple(job["strategies"])
        job["codecs"] = tuple(job.get("codecs", ()))
        job["adaptive_codecs"] = tuple(job.get("adaptive_codecs", ()))
        job["speeds"] = tuple(job.get("speeds", ()))
        data["job"] = Job(**job)
        return cls(**data)


__all__ = [
    "ENGINE_STRATEGIES",
    "PEER_STRATEGIES",
    "STRATEGIES",
    "Job",
    "JobSpec",
    "ModelCase",
    "Scenario",
    "load_scenario",
    "scenario_from_dict",
]
