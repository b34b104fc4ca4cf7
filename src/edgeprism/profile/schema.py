"""The versioned profile file: what was measured once, offline, and all the planner ever reads.

A profile is plain data (frozen dataclasses, JSON round-trip). Units are in the field names;
`_bps` is bits per second everywhere (links and staging copies alike).

JSON sketch (schema_version 1)::

    {"schema_version": 1, "created_utc": "2025-01-01T00:00:00Z",
     "model": {...ModelConfig...}, "config_hash": "…16 hex…", "world_size": 2,
     "device_speeds": [1.0, 0.8],
     "host": {"host_id": "", "cpu_model": "…", "num_cores": 1, "torch_version": "2.13.0",
              "device_kind": "cpu", "python_version": "3.11.7"},
     "compute": {"fixed_s": …, "per_token_s": …, "per_kv_s": …, "per_token_kv_s": …,
                 "request_overhead_s": …, "samples": [{"batch": 1, "num_own_tokens": 197,
                 "num_kv_vectors": 197, "seconds_per_layer": 0.029}, …]},
     "staging": {"present": false, "d2h_latency_s": 0, "d2h_bandwidth_bps": 0, …, "samples": []},
     "link": {"latency_s": 0.003, "bandwidth_bps": 5e7, "medium": "switched", "method": "…",
              "emulation": "…"},
     "energy": {"source": "modelled", "idle_w": …, "compute_w": …, "staging_w": …, "network_w": …,
                "meter": "…"},
     "codecs": [{"codec": "fp32", "cr": 1, "wire_dtype": "float32", "wire_bytes_per_token": 3073.0,
                 "wire_bytes_per_row": 0.0, "metric": "top1_agreement", "value": 1.0,
                 "reference_value": 1.0, "loss": 0.0}, …],
     "input_bytes_per_token": 3072.0, "output_bytes_per_row": 3072.0, "notes": "",
     "devices": [{"rank": 0, "device_kind": "cpu", "num_cores": 4, "device": "cpu", "host_id": "…8 hex…",
                  "cpu_model": "…", "staging": "…", "energy": {…EnergyModel…} or null}, …]}

`devices` is optional (a profile of a joined cluster has one entry per rank; older files have none, and
a profile without devices writes no `devices` key, so its hash is what it always was).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgeprism.models.config import ModelConfig

SCHEMA_VERSION = 1

EnergySource = Literal["metered", "modelled"]
T = typing.TypeVar("T")
LinkMedium = Literal["switched", "shared"]


def _check_nonneg(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{owner}.{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class HostFacts:
    """The machine the profile was measured on. Never a host name: `host_id` is at most a short hash
    of one, or empty."""

    cpu_model: str
    num_cores: int
    torch_version: str
    device_kind: str
    """"cpu", "cuda:Orin", "cuda:NVIDIA H200", …"""
    python_version: str = ""
    host_id: str = ""

    def __post_init__(self) -> None:
        if self.num_cores < 1:
            raise ValueError(f"host.num_cores must be >= 1, got {self.num_cores}")


@dataclass(frozen=True)
class ComputeSample:
    """One measured point: seconds of one Transformer layer on the reference device (rank speed 1.0)
    for `batch` rows, `num_own_tokens` query tokens and `num_kv_vectors` key/value vectors per row."""

    batch: int
    num_own_tokens: int
    num_kv_vectors: int
    seconds_per_layer: float

    def __post_init__(self) -> None:
        if self.batch < 1 or self.num_own_tokens < 1 or self.num_kv_vectors < self.num_own_tokens:
            raise ValueError(f"bad compute sample {self}: need batch >= 1, tokens >= 1, kv >= tokens")
        _check_nonneg("compute sample", seconds_per_layer=self.seconds_per_layer)


@dataclass(frozen=True)
class ComputeTable:
    """Per-layer time on the reference device, fitted to the samples by non-negative least squares:

        t_layer = fixed_s + per_token_s·B·n + per_kv_s·B·kv + per_token_kv_s·B·n·kv

    (Q/O/MLP scale with own tokens n, K/V projections with kv vectors, attention with n·kv). A rank
    of relative speed s takes t_layer / s. `request_overhead_s` is once per request (embedding, head).
    The raw samples are kept so the fit can be checked or redone."""

    fixed_s: float
    per_token_s: float
    per_kv_s: float
    per_token_kv_s: float
    request_overhead_s: float = 0.0
    samples: tuple[ComputeSample, ...] = ()

    def __post_init__(self) -> None:
        _check_nonneg("compute", fixed_s=self.fixed_s, per_token_s=self.per_token_s, per_kv_s=self.per_kv_s,
                      per_token_kv_s=self.per_token_kv_s, request_overhead_s=self.request_overhead_s)

    def layer_seconds(self, batch: int, num_own_tokens: int, num_kv_vectors: int) -> float:
        rows_tokens = batch * num_own_tokens
        return (self.fixed_s + self.per_token_s * rows_tokens + self.per_kv_s * batch * num_kv_vectors
                + self.per_token_kv_s * rows_tokens * num_kv_vectors)

    @classmethod
    def fit(cls, samples: typing.Sequence[ComputeSample], request_overhead_s: float = 0.0,
            relative: bool = False) -> ComputeTable:
        """Least squares with coefficients clamped at zero (a negative one is dropped and the rest refitted).
        `relative` minimises relative rather than absolute error (points spanning orders of magnitude).
        Samples where n == kv everywhere cannot separate per_token_s from per_kv_s; the fit then splits
        them (minimum norm), which predicts local runs well and distributed ones less so."""
        import numpy as np

        if not samples:
            raise ValueError("cannot fit a compute table to zero samples")
        rows = np.array([[1.0, s.batch * s.num_own_tokens, s.batch * s.num_kv_vectors,
                          s.batch * s.num_own_tokens * s.num_kv_vectors] for s in samples])
        target = np.array([s.seconds_per_layer for s in samples])
        if relative:
            weight = 1.0 / np.maximum(target, 1e-12)
            rows, target = rows * weight[:, None], target * weight
        scale = np.abs(rows).max(axis=0)
        scale[scale == 0] = 1.0
        active = [0, 1, 2, 3]
        coef = np.zeros(4)
        while active:
            sol, *_ = np.linalg.lstsq(rows[:, active] / scale[active], target, rcond=None)
            sol = sol / scale[active]
            if (sol >= 0).all():
                coef[:] = 0.0
                coef[active] = sol
                break
            active.pop(int(np.argmin(sol)))
        return cls(float(coef[0]), float(coef[1]), float(coef[2]), float(coef[3]),
                   request_overhead_s=request_overhead_s, samples=tuple(samples))


@dataclass(frozen=True)
class StagingSample:
    direction: Literal["d2h", "h2d"]
    nbytes: int
    seconds: float


@dataclass(frozen=True)
class StagingTable:
    """Device↔host copies around every exchange: seconds = latency_s + 8·nbytes / bandwidth_bps.
    On CPU-only hosts there is no staging: `present=False` and the numbers are ignored."""

    present: bool
    d2h_latency_s: float = 0.0
    d2h_bandwidth_bps: float = 0.0
    h2d_latency_s: float = 0.0
    h2d_bandwidth_bps: float = 0.0
    samples: tuple[StagingSample, ...] = ()

    def __post_init__(self) -> None:
        _check_nonneg("staging", d2h_latency_s=self.d2h_latency_s, d2h_bandwidth_bps=self.d2h_bandwidth_bps,
                      h2d_latency_s=self.h2d_latency_s, h2d_bandwidth_bps=self.h2d_bandwidth_bps)
        if self.present and (self.d2h_bandwidth_bps <= 0 or self.h2d_bandwidth_bps <= 0):
            raise ValueError("staging is present but a bandwidth is 0: "
                             f"d2h {self.d2h_bandwidth_bps} bps, h2d {self.h2d_bandwidth_bps} bps")

    def d2h_seconds(self, nbytes: float) -> float:
        return self.d2h_latency_s + 8.0 * nbytes / self.d2h_bandwidth_bps if self.present else 0.0

    def h2d_seconds(self, nbytes: float) -> float:
        return self.h2d_latency_s + 8.0 * nbytes / self.h2d_bandwidth_bps if self.present else 0.0


@dataclass(frozen=True)
class LinkMeasurement:
    """The link as profiled. `medium="switched"`: each rank has its own `bandwidth_bps` (an exchange
    takes as long as the busiest receiver); `"shared"`: all transfers share it (one WiFi channel)."""

    latency_s: float
    bandwidth_bps: float
    medium: LinkMedium = "switched"
    method: str = ""
    """How it was measured, e.g. "all_gather sweep 1 KiB..4 MiB, 2 ranks, GLOO"."""
    emulation: str = ""
    """Emulated link, e.g. "tc netem rate 50mbit delay 3ms"; empty for a real link."""
    burst_bytes: float = 0.0
    """Bytes a message sends at line rate after an idle gap (a token bucket's depth; 0: no credit)."""

    def __post_init__(self) -> None:
        _check_nonneg("link", latency_s=self.latency_s, bandwidth_bps=self.bandwidth_bps,
                      burst_bytes=self.burst_bytes)
        if self.bandwidth_bps <= 0:
            raise ValueError(f"link.bandwidth_bps must be > 0, got {self.bandwidth_bps}")


@dataclass(frozen=True)
class EnergyModel:
    """Power per phase of one device, in watts. `source` says whether it came from a meter or a model."""

    source: EnergySource
    idle_w: float
    compute_w: float
    staging_w: float
    network_w: float
    meter: str = ""
    """Which meter or model produced the numbers, e.g. "INA3221 VDD_IN" or "TDP/cores estimate"."""

    def __post_init__(self) -> None:
        _check_nonneg("energy", idle_w=self.idle_w, compute_w=self.compute_w, staging_w=self.staging_w,
                      network_w=self.network_w)


@dataclass(frozen=True)
class CodecFidelity:
    """One exchange codec as profiled for this model: what it costs on the wire and what it loses.

    `wire_bytes_per_token` is bytes per own token per layer (codec.nbytes / (B·n) at the profiled
    size; for codecs whose message changes by layer, the mean over the model's layers); `wire_bytes_per_row` is a fixed part per batch row (anchors, scales). `loss` is
    (reference_value - value) / reference_value clamped to [0, 1]; None when fidelity was not measured."""

    codec: str
    cr: int
    wire_dtype: str
    wire_bytes_per_token: float
    wire_bytes_per_row: float = 0.0
    extra_vectors_per_row: int = 0
    """Vectors a receiver attends to per sender row beyond ceil(n / cr) (exact anchor slots)."""
    metric: str | None = None
    value: float | None = None
    reference_value: float | None = None
    loss: float | None = None

    def __post_init__(self) -> None:
        if self.cr < 1:
            raise ValueError(f"codec {self.codec!r}: cr must be >= 1, got {self.cr}")
        _check_nonneg(f"codec {self.codec!r}", wire_bytes_per_token=self.wire_bytes_per_token,
                      wire_bytes_per_row=self.wire_bytes_per_row)
        if self.loss is not None and not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"codec {self.codec!r}: loss must be in [0, 1], got {self.loss}")

    @classmethod
    def from_codec(cls, codec: Any, hidden_size: int, metric: str | None = None, value: float | None = None,
                   reference_value: float | None = None, num_layers: int | None = None) -> CodecFidelity:
        """The entry for an `edgeprism.compress` codec: wire costs from its exact byte counts, fidelity as given.

        Bytes are the mean over the model's `num_layers` exchanges (`compress.mean_nbytes`), so
        entry bytes × num_layers is what a request sends. That matters for stateful codecs whose
        message changes by layer (delta coding: a key frame at layer 0, smaller residuals after), which
        need `num_layers`; for every other codec the mean is `nbytes` and `num_layers` changes nothing.
        The byte count is affine in n over whole segments (and whole bytes of a bit-packed mask), so two
        probes at multiples of 8·ratio give the per-token slope and the per-row intercept exactly. A
        constant per message (the 2-byte width of a low-bit format) lands in the per-row part: exact for
        one row, 2 bytes per extra row and message over."""
        from edgeprism.compress.registry import mean_nbytes

        if num_layers is None:
            if hasattr(codec, "layer_nbytes"):
                raise ValueError(f"codec {codec.name}: its message changes by layer (key frame, then residuals); "
                                 f"give num_layers (the model's block count) to charge the mean per layer")
            num_layers = 1
        cr = int(getattr(codec, "ratio", 1))
        probe = 64 * cr
        small = mean_nbytes(codec, num_layers, 1, probe, hidden_size)
        per_token = (mean_nbytes(codec, num_layers, 1, 2 * probe, hidden_size) - small) / probe
        values = getattr(codec, "values", None)
        loss = None
        if value is not None and reference_value is not None:
            loss = cls.normalised_loss(value, reference_value)
        return cls(codec=codec.name, cr=cr, wire_dtype=getattr(values, "name", codec.name),
                   wire_bytes_per_token=per_token, wire_bytes_per_row=small - probe * per_token,
                   extra_vectors_per_row=int(getattr(codec, "max_anchors", 0)), metric=metric, value=value,
                   reference_value=reference_value, loss=loss)

    @staticmethod
    def normalised_loss(value: float, reference_value: float) -> float:
        if reference_value == 0:
            return 0.0 if value == 0 else 1.0
        return min(1.0, max(0.0, (reference_value - value) / abs(reference_value)))


@dataclass(frozen=True)
class DeviceDescription:
    """One rank's device as profiled on a joined cluster: what a device joining a coordinator served with
    this profile must match (`device_kind`, `num_cores`). Like `HostFacts`, never a host name."""

    rank: int
    device_kind: str
    """"cpu", "cuda:Orin", … (as `HostFacts.device_kind`)."""
    num_cores: int
    """CPU cores the rank's process could use (its affinity: `edgeprism join --cores`)."""
    device: str = "cpu"
    """The torch device the rank ran on."""
    host_id: str = ""
    """Short hash of the host name (ranks on one machine share it)."""
    cpu_model: str = ""
    staging: str = ""
    """How this rank's staging was measured (a CPU device has none)."""
    energy: EnergyModel | None = None
    """This rank's power per phase, with its own meter (or modelled, and the source says so)."""

    def __post_init__(self) -> None:
        if self.rank < 0 or self.num_cores < 1:
            raise ValueError(f"device rank {self.rank} must be >= 0 and num_cores {self.num_cores} >= 1")

    def __str__(self) -> str:
        host = f" on host {self.host_id}" if self.host_id else ""
        return f"rank {self.rank}: {self.device_kind}, {self.num_cores} core{'s' * (self.num_cores != 1)}{host}"


@dataclass(frozen=True)
class Profile:
    """Everything measured once for one model on one group of `world_size` devices."""

    model: ModelConfig
    config_hash: str
    world_size: int
    device_speeds: tuple[float, ...]
    """Relative speed per rank (rank 0's device is the reference the compute table was measured on)."""
    host: HostFacts
    compute: ComputeTable
    staging: StagingTable
    link: LinkMeasurement
    energy: EnergyModel
    codecs: tuple[CodecFidelity, ...]
    input_bytes_per_token: float
    """Raw input bytes scattered per token (ViT: patch pixels as float32; text: one int64 id)."""
    output_bytes_per_row: float
    """Output bytes gathered to rank 0 per row from a rank holding an output position."""
    created_utc: str = ""
    notes: str = ""
    schema_version: int = SCHEMA_VERSION
    devices: tuple[DeviceDescription, ...] = ()
    """Each rank's device, when the profile was measured on a joined cluster (empty: not recorded)."""

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"profile schema_version {self.schema_version} is not supported "
                             f"(this edgeprism reads version {SCHEMA_VERSION}); re-run `edgeprism profile`")
        if self.world_size < 1:
            raise ValueError(f"profile world_size must be >= 1, got {self.world_size}")
        if len(self.device_speeds) != self.world_size:
            raise ValueError(f"profile has {len(self.device_speeds)} device speeds for world_size {self.world_size}")
        if any(not (math.isfinite(s) and s > 0) for s in self.device_speeds):
            raise ValueError(f"device speeds must be finite and > 0, got {self.device_speeds}")
        if self.config_hash != self.model.config_hash():
            raise ValueError(f"profile config_hash {self.config_hash} does not match its model "
                             f"{self.model.name} (hash {self.model.config_hash()})")
        names = [c.codec for c in self.codecs]
        if len(set(names)) != len(names):
            raise ValueError(f"profile lists a codec twice: {names}")
        _check_nonneg("profile", input_bytes_per_token=self.input_bytes_per_token,
                      output_bytes_per_row=self.output_bytes_per_row)
        if self.devices and [d.rank for d in self.devices] != list(range(self.world_size)):
            raise ValueError(f"profile devices are for ranks {[d.rank for d in self.devices]}; world_size "
                             f"{self.world_size} needs one per rank 0..{self.world_size - 1}, in order")

    @property
    def model_name(self) -> str:
        return self.model.name

    def codec(self, name: str) -> CodecFidelity:
        for entry in self.codecs:
            if entry.codec == name:
                return entry
        raise ValueError(f"codec {name!r} is not in the profile; profiled: {', '.join(c.codec for c in self.codecs)}")

    # ---- serialisation ----
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.devices:
            del data["devices"]  # an older profile's JSON (and hash) stays what it was
        return {"schema_version": data.pop("schema_version"), **data}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any) -> Profile:
        if not isinstance(data, dict):
            raise ValueError(f"a profile is a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"profile schema_version {version!r} is not supported "
                             f"(this edgeprism reads version {SCHEMA_VERSION}); re-run `edgeprism profile`")
        return _build(cls, data, "profile")

    @classmethod
    def from_json(cls, text: str) -> Profile:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"profile is not valid JSON (corrupt or truncated, {len(text)} chars): {err}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path, expect_model: str | ModelConfig | None = None,
             expect_world_size: int | None = None) -> Profile:
        """Read and check a profile. Every bad case is a ValueError naming the file and the numbers."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ValueError(f"profile {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read profile {path}: {err}") from None
        try:
            profile = cls.from_json(text)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        profile.check(expect_model, expect_world_size, where=str(path))
        return profile

    def check(self, expect_model: str | ModelConfig | None = None, expect_world_size: int | None = None,
              where: str = "profile") -> None:
        """Refuse a profile made for another model, architecture or world size."""
        if expect_model is not None:
            name = expect_model if isinstance(expect_model, str) else expect_model.name
            if name != self.model.name:
                raise ValueError(f"{where} was made for model {self.model.name}, not {name}")
            if isinstance(expect_model, ModelConfig) and expect_model.config_hash() != self.config_hash:
                raise ValueError(f"{where} was made for another {name} architecture "
                                 f"(config hash {self.config_hash}, expected {expect_model.config_hash()})")
        if expect_world_size is not None and expect_world_size != self.world_size:
            raise ValueError(f"{where} was made for world size {self.world_size}, not {expect_world_size}")

    def derived(self, key: str, compute: typing.Callable[[Profile], T]) -> T:
        """`compute(self)`, memoised on this instance under `key` (the planner's precomputed tables).

        The profile is immutable all the way down, so a value derived from it purely can never go stale;
        the memo lives and dies with the instance (no module-level state) and is not part of the data."""
        memo = self.__dict__.get("_derived")
        if memo is None:
            memo = {}
            object.__setattr__(self, "_derived", memo)
        if key not in memo:
            memo[key] = compute(self)
        return memo[key]

    def profile_hash(self) -> str:
        """Short stable hash of the whole profile, recorded in plans and benchmark rows."""
        # Memoised: the planner stamps it on every plan and hashing costs ~100 µs.
        def compute(profile: Profile) -> str:
            canonical = json.dumps(profile.to_dict(), sort_keys=True, separators=(",", ":"))
            return hashlib.sha256(canonical.encode()).hexdigest()[:16]
        return self.derived("profile_hash", compute)

    def __str__(self) -> str:
        codecs = ", ".join(f"{c.codec}(loss {'?' if c.loss is None else f'{c.loss:.3f}'})" for c in self.codecs)
        return (f"Profile v{self.schema_version} {self.model.name} [{self.config_hash}] world_size={self.world_size} "
                f"speeds={self.device_speeds} device={self.host.device_kind} torch={self.host.torch_version} "
                f"link={self.link.bandwidth_bps / 1e6:g} Mbit/s {self.link.latency_s * 1e3:g} ms "
                f"staging={'yes' if self.staging.present else 'no'} energy={self.energy.source} codecs=[{codecs}]")


# ---- generic, strict dict -> dataclass construction ----

def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {unknown}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where} is missing field {f.name!r}")
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {type(value).__name__}")
        return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    raise AssertionError(f"no JSON conversion for {tp!r} at {where}")


__all__ = [
    "SCHEMA_VERSION", "HostFacts", "ComputeSample", "ComputeTable", "StagingSample", "StagingTable",
    "LinkMeasurement", "EnergyModel", "CodecFidelity", "DeviceDescription", "Profile",
]
