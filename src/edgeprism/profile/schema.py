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
                 "reference_value": 1.0, "loss": 0.0, "encode_s_per_vector": 1e-7,
                 "decode_s_per_vector": 1e-7}, …],
     "input_bytes_per_token": 3072.0, "output_bytes_per_row": 3072.0, "notes": "",
     "devices": [{"rank": 0, "device_kind": "cpu", "num_cores": 4, "device": "cpu", "host_id": "…8 hex…",
                  "cpu_model": "…", "staging": "…", "energy": {…EnergyModel…} or null}, …]}

`devices` is optional (a profile of a joined cluster has one entry per rank; older files have none, and
a profile without devices writes no `devices` key, so its hash is what it always was). A codec entry's
`encode_s_per_vector` / `decode_s_per_vector` likewise (absent: 0, not measured), and `label_shift` (absent: not
measured; the near-tie guard's margin, runtime/guard.py). `sealing` likewise:
`{"overhead_bytes": 28, "per_message_s": …, "per_byte_s": …, "samples": [{"codec": "fp32",
"message_bytes": …, "seal_open_s": …}, …], "method": "…"}` (profile/sealing.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeprism.models.config import ModelConfig
from edgeprism.profile.jsondata import from_json_dict, read_data_file, to_json_dict
from edgeprism.profile.sealing import SealingCost
from edgeprism.profile.tables import (
    CodecFidelity,
    ComputeSample,
    ComputeTable,
    DeviceDescription,
    EnergyModel,
    EnergySource,
    HostFacts,
    LinkMeasurement,
    LinkMedium,
    StagingSample,
    StagingTable,
    check_nonneg,
)

SCHEMA_VERSION = 1
T = typing.TypeVar("T")


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
    """Raw input bytes scattered per token (ViT: patch pixels as float32; text: one int64 id). 8-bit pixels travel
    in about a quarter of it (partition/scatter.py): such a request says so (`plan.Request.input_bytes_per_token`)."""
    output_bytes_per_row: float
    """Output bytes gathered to rank 0 per row from a rank holding an output position."""
    created_utc: str = ""
    notes: str = ""
    schema_version: int = SCHEMA_VERSION
    devices: tuple[DeviceDescription, ...] = ()
    """Each rank's device, when the profile was measured on a joined cluster (empty: not recorded)."""
    sealing: SealingCost | None = None
    """What sealing the data lanes costs per codec (profile/sealing.py); None: not measured, not charged."""

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
        check_nonneg("profile", input_bytes_per_token=self.input_bytes_per_token,
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
        data = to_json_dict(self)
        if not self.devices:
            del data["devices"]  # an older profile's JSON (and hash) stays what it was
        if self.sealing is None:
            del data["sealing"]  # likewise
        for entry in data["codecs"]:  # likewise for codec entries without measured encode/decode seconds
            for key in ("encode_s_per_vector", "decode_s_per_vector"):
                if not entry[key]:
                    del entry[key]
            if entry["label_shift"] is None:
                del entry["label_shift"]
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
        return from_json_dict(cls, data, "profile")

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
        text = read_data_file(path, "profile")
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


__all__ = [
    "SCHEMA_VERSION",
    "CodecFidelity",
    "ComputeSample",
    "ComputeTable",
    "DeviceDescription",
    "EnergyModel",
    "EnergySource",
    "HostFacts",
    "LinkMeasurement",
    "LinkMedium",
    "Profile",
    "StagingSample",
    "StagingTable",
]
