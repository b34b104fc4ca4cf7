"""The measured parts of a profile: host facts, compute and staging tables, the link, the energy model,
and one entry per exchange codec. Plain frozen data; `profile/schema.py` assembles them into a Profile."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

from edgeprism.compress.base import Codec
from edgeprism.compress.kvshare import NAME as KV_SHARE_NAME
from edgeprism.compress.kvshare import KVShareCodec
from edgeprism.compress.registry import get_codec, is_lossless, mean_nbytes
from edgeprism.evaluate.metrics import SECONDARY_METRICS

EnergySource = Literal["metered", "modelled"]
LinkMedium = Literal["switched", "shared"]


def check_nonneg(owner: str, **values: float) -> None:
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
        check_nonneg("compute sample", seconds_per_layer=self.seconds_per_layer)


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
        check_nonneg("compute", fixed_s=self.fixed_s, per_token_s=self.per_token_s, per_kv_s=self.per_kv_s,
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
        import numpy as np  # optional heavy dependency, needed only to fit

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
        check_nonneg("staging", d2h_latency_s=self.d2h_latency_s, d2h_bandwidth_bps=self.d2h_bandwidth_bps,
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
    exchange_compute_s_per_byte: float = 0.0
    """Seconds of compute a device loses per byte it receives in an all-gather (it forwards about as many), at
    speed 1: on a CPU-only device the network stack runs on the cores that compute (profile/exchange_cost.py).
    0: not measured (a profile from before it, or one process)."""

    def __post_init__(self) -> None:
        check_nonneg("link", latency_s=self.latency_s, bandwidth_bps=self.bandwidth_bps,
                      burst_bytes=self.burst_bytes, exchange_compute_s_per_byte=self.exchange_compute_s_per_byte)
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
        check_nonneg("energy", idle_w=self.idle_w, compute_w=self.compute_w, staging_w=self.staging_w,
                      network_w=self.network_w)


@dataclass(frozen=True)
class CodecFidelity:
    """One exchange codec as profiled for this model: what it costs on the wire and what it loses.

    `wire_bytes_per_token` is bytes per own token per layer (codec.nbytes / (B·n) at the profiled
    size; for codecs whose message changes by layer, the mean over the model's layers); `wire_bytes_per_row`
    is a fixed part per batch row (anchors, scales). `loss` is
    (reference_value - value) / reference_value clamped to [0, 1]; None when fidelity was not measured.
    `encode_s_per_vector` / `decode_s_per_vector`: the codec's own compute at speed 1.0 per vector sent /
    received (profile/codec_timing.py); 0 when not measured (older profiles), which charges nothing."""

    codec: str
    cr: int
    wire_dtype: str
    wire_bytes_per_token: float
    wire_bytes_per_row: float = 0.0
    extra_vectors_per_row: int = 0
    """The codec's exact vectors per sender row beside the compressed ones (anchor slots), as recorded;
    the cost model asks the codec itself how many vectors it sends (`num_vectors`)."""
    metric: str | None = None
    value: float | None = None
    reference_value: float | None = None
    loss: float | None = None
    encode_s_per_vector: float = 0.0
    decode_s_per_vector: float = 0.0
    label_shift: float | None = None
    """The largest change this codec made in the difference of two labels' probabilities on the model's
    evaluation sets (`evaluate.metrics.LABEL_SHIFT_METRIC`): the near-tie guard's measured margin
    (runtime/guard.py). None: not measured (no classifier, or an older profile)."""

    def __post_init__(self) -> None:
        if self.label_shift is not None and not 0.0 <= self.label_shift <= 2.0:
            raise ValueError(f"codec {self.codec!r}: label_shift must be in [0, 2] (a change of a difference of two "
                             f"probabilities), got {self.label_shift}")
        if self.cr < 1:
            raise ValueError(f"codec {self.codec!r}: cr must be >= 1, got {self.cr}")
        check_nonneg(f"codec {self.codec!r}", wire_bytes_per_token=self.wire_bytes_per_token,
                      wire_bytes_per_row=self.wire_bytes_per_row, encode_s_per_vector=self.encode_s_per_vector,
                      decode_s_per_vector=self.decode_s_per_vector)
        if self.loss is not None and not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"codec {self.codec!r}: loss must be in [0, 1], got {self.loss}")

    @property
    def exchange_codec(self) -> Codec:
        """The `edgeprism.compress` codec this entry names (parsed once per entry, kept on the instance)."""
        codec = self.__dict__.get("_codec")
        if codec is None:
            try:
                codec = get_codec(self.codec)
            except ValueError as err:
                raise ValueError(f"profile codec {self.codec!r} is unknown here ({err}); register it with "
                                 f"compress.registry.register_codec before planning") from None
            object.__setattr__(self, "_codec", codec)  # a cache, not data: not a dataclass field
        return codec

    @property
    def fidelity_loss(self) -> float | None:
        """The loss the planner budgets for: the measured `loss`; 0 for an unmeasured lossless float wire
        (`compress.registry.LOSSLESS_CODECS`); None when unmeasured (used only by explicit opt-in). A loss
        measured by a metric that is only reported (`report_only_metric`: a decoder's perplexity) counts
        as unmeasured."""
        if self.loss is not None and self.report_only_metric is None:
            return self.loss
        return 0.0 if is_lossless(self.codec) else None

    @property
    def report_only_metric(self) -> str | None:
        """The metric of the recorded loss when a budget may not use it (`evaluate.metrics.SECONDARY_METRICS`:
        a decoder measured by perplexity alone, as profiles before next-token agreement were), else None."""
        return self.metric if self.loss is not None and self.metric in SECONDARY_METRICS else None

    def num_vectors(self, num_tokens: int) -> int:
        """Vectors (K/V rows) a receiver attends to per row from a sender of `num_tokens` tokens: asked of
        the codec, whatever its shape (`Codec.num_vectors`)."""
        return self.exchange_codec.num_vectors(num_tokens)

    @property
    def kv_share(self) -> bool:
        """The codec sends a share of the tokens as keys and values (compress/kvshare.py, `kv<P>:<format>`)."""
        kv_share = self.__dict__.get("_kv_share")
        if kv_share is None:
            kv_share = KV_SHARE_NAME.fullmatch(self.codec.strip().lower()) is not None
            object.__setattr__(self, "_kv_share", kv_share)  # a cache, not data (the planner's hot loop asks)
        return kv_share

    def kv_tokens(self, num_tokens: int) -> int:
        """Of a sender's `num_tokens` tokens, how many travel as keys and values (each two vectors on the wire,
        nothing for a receiver to project): asked of the codec; 0 for every codec but a kv share."""
        if not self.kv_share:
            return 0
        return int(self.exchange_codec.kv_tokens(num_tokens))  # type: ignore[attr-defined]

    def wire_vectors(self, num_tokens: int) -> int:
        """Vectors per row a sender of `num_tokens` tokens encodes and each receiver decodes: `num_vectors` plus
        a kv share's second vector (the value) per token sent as keys and values."""
        return self.num_vectors(num_tokens) + self.kv_tokens(num_tokens)

    def wire_tokens(self, num_tokens: int) -> float:
        """What a message of `num_tokens` tokens weighs in units of `wire_bytes_per_token`: `num_tokens`, except
        that a kv share rounds its keys-and-values tokens per message (`kv_tokens`), which the per-token mean
        (its share of a hundred tokens) does not."""
        if not self.kv_share:
            return float(num_tokens)
        return self.wire_vectors(num_tokens) * 100 / self.wire_vectors(100)

    @classmethod
    def from_codec(cls, codec: Codec, hidden_size: int, metric: str | None = None, value: float | None = None,
                   reference_value: float | None = None, num_layers: int | None = None) -> CodecFidelity:
        """The entry for an `edgeprism.compress` codec: wire costs from its exact byte counts, fidelity as given.

        Bytes are the mean over the model's `num_layers` exchanges (`compress.mean_nbytes`), so
        entry bytes × num_layers is what a request sends. That matters for stateful codecs whose
        message changes by layer (delta coding: a key frame at layer 0, smaller residuals after), which
        need `num_layers`; for every other codec the mean is `nbytes` and `num_layers` changes nothing.
        The byte count is affine in n over whole segments (and whole bytes of a bit-packed mask), so two
        probes at multiples of 8·ratio give the per-token slope and the per-row intercept exactly (a kv share's
        at multiples of 800, where its P % is whole tokens too; `wire_tokens` has its rounding per message). A
        constant per message (the 2-byte width of a low-bit format) lands in the per-row part: exact for
        one row, 2 bytes per extra row and message over."""
        if num_layers is None:
            if hasattr(codec, "layer_nbytes"):
                raise ValueError(f"codec {codec.name}: its message changes by layer (key frame, then residuals); "
                                 f"give num_layers (the model's block count) to charge the mean per layer")
            num_layers = 1
        cr = int(codec.ratio)
        # a kv share sends round(P · n / 100) of n tokens as keys and values: exact (and whole mask bytes) at 800
        probe = 800 * cr if isinstance(codec, KVShareCodec) else 64 * cr
        small = mean_nbytes(codec, num_layers, 1, probe, hidden_size)
        per_token = (mean_nbytes(codec, num_layers, 1, 2 * probe, hidden_size) - small) / probe
        inner: Codec = codec.inner if isinstance(codec, KVShareCodec) else codec  # a kv share's format
        values = getattr(inner, "values", None)
        loss = None
        if value is not None and reference_value is not None:
            loss = cls.normalised_loss(value, reference_value)
        return cls(codec=codec.name, cr=cr, wire_dtype=getattr(values, "name", inner.name),
                   wire_bytes_per_token=per_token, wire_bytes_per_row=small - probe * per_token,
                   extra_vectors_per_row=int(codec.extra_vectors), metric=metric, value=value,
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


__all__ = [
    "CodecFidelity",
    "ComputeSample",
    "ComputeTable",
    "DeviceDescription",
    "EnergyModel",
    "EnergySource",
    "HostFacts",
    "LinkMeasurement",
    "LinkMedium",
    "StagingSample",
    "StagingTable",
]
