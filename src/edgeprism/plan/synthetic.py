"""Synthetic profiles with realistic numbers, for planner tests, examples and `edgeprism plan` demos.

Sources of the numbers (all labelled synthetic in the profile's notes):
- Compute: a layer costs ~24·d² FLOPs per token (QKV 6d², output 2d², MLP 16d²) of which K/V are 4d²
  per key/value vector, plus 4·d per (query, key) pair for scores and weighted sum. The FLOP rate is set
  so that ViT-B/16 takes 0.35 s per 224x224 image (197 tokens) on one rank of speed 1.0 — one small
  CPU core. Plus 0.2 ms fixed per layer (dispatch) and 5 ms per request (embedding, head).
- Link: WiFi 4 at 50 Mbit/s, 3 ms per message.
- Energy: a modelled small board: idle 2 W, computing 6 W, staging 3 W, radio +1.5 W.
- Codec wire bytes follow `edgeprism.compress` layouts for hidden size d (counts included);
  fidelity losses follow docs/ARCHITECTURE.md rule 8: fp16 ~0, int8 ~1.5 %, Segment Means lossy,
  int4 left unmeasured on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgeprism.models.config import ModelConfig, get_config
from edgeprism.profile.schema import (
    CodecFidelity,
    ComputeSample,
    ComputeTable,
    EnergyModel,
    HostFacts,
    LinkMeasurement,
    Profile,
    StagingTable,
)

VIT_B16_SECONDS_PER_IMAGE = 0.35
"""One image of ViT-B/16 at 224x224 on the reference (speed 1.0) rank."""

# (codec, cr, wire dtype, value bytes per element, bytes per vector besides values, anchors, loss or None)
_CODECS: tuple[tuple[str, int, str, float, float, int, float | None], ...] = (
    ("fp32", 1, "fp32", 4.0, 1.0, 0, 0.0),
    ("fp16", 1, "fp16", 2.0, 1.0, 0, 0.0),
    ("int8", 1, "int8", 1.0, 3.0, 0, 0.015),
    ("int4", 1, "int4", 0.5, 1.0 + 1 / 16, 0, None),
    ("sm2", 2, "fp32", 4.0, 1.0, 0, 0.20),
    ("sm4", 4, "fp32", 4.0, 1.0, 0, 0.35),
    ("sm4a+int8", 4, "int8", 1.0, 3.0, 2, 0.04),
    ("sm16+int8", 16, "int8", 1.0, 3.0, 0, 0.60),
)


def synthetic_codecs(hidden_size: int) -> tuple[CodecFidelity, ...]:
    out = []
    for name, cr, dtype, value_bytes, other_bytes, anchors, loss in _CODECS:
        per_vector = value_bytes * hidden_size + other_bytes + (hidden_size / 16 if dtype == "int4" else 0.0)
        out.append(CodecFidelity(
            codec=name, cr=cr, wire_dtype=dtype, wire_bytes_per_token=per_vector / cr,
            wire_bytes_per_row=anchors * per_vector, extra_vectors_per_row=anchors,
            metric=None if loss is None else "top1_agreement",
            value=None if loss is None else 1.0 - loss, reference_value=None if loss is None else 1.0, loss=loss))
    return tuple(out)


def synthetic_compute(model_name: str | ModelConfig = "vit-base-patch16-224",
                      seconds_per_image: float = VIT_B16_SECONDS_PER_IMAGE) -> ComputeTable:
    """A compute table for `model_name` (a preset, or a config such as a checkpoint folder's) whose FLOP
    rate makes ViT-B/16 take `seconds_per_image`."""
    config = get_config(model_name) if isinstance(model_name, str) else model_name
    ref = get_config("vit-base-patch16-224")
    ref_tokens = ref.num_tokens()
    d_ref = ref.hidden_size
    ref_flops = ref.num_layers * (24 * d_ref**2 * ref_tokens + 4 * d_ref * ref_tokens**2)
    seconds_per_flop = seconds_per_image / ref_flops
    d, d_kv = config.hidden_size, config.kv_heads * config.head_dim
    mlp_ratio = config.intermediate_size / d
    per_token_flops = (2 + 2 + 2 * config.mlp_matrices * mlp_ratio) * d * d  # Q and output projections, MLP
    per_kv_flops = 4 * d * d_kv  # K and V projections (plan/accounting.py's convention)
    if config.exchanges_kv:  # received K/V arrive projected: only own tokens are projected
        per_token_flops, per_kv_flops = per_token_flops + per_kv_flops, 0
    table = ComputeTable(fixed_s=2e-4, per_token_s=per_token_flops * seconds_per_flop,
                         per_kv_s=per_kv_flops * seconds_per_flop, per_token_kv_s=4 * d * seconds_per_flop,
                         request_overhead_s=5e-3)
    samples = tuple(ComputeSample(b, n, kv, table.layer_seconds(b, n, kv))
                    for b in (1, 4) for n, kv in ((50, 50), (99, 197), (197, 197)))
    return ComputeTable(table.fixed_s, table.per_token_s, table.per_kv_s, table.per_token_kv_s,
                        table.request_overhead_s, samples)


def synthetic_profile(model_name: str | ModelConfig = "vit-base-patch16-224", world_size: int = 2,
                      device_speeds: Sequence[float] | None = None, bandwidth_bps: float = 50e6,
                      latency_s: float = 3e-3, medium: str = "switched", staging: bool = False,
                      energy_source: str = "modelled", codecs: Sequence[CodecFidelity] | None = None,
                      seconds_per_image: float = VIT_B16_SECONDS_PER_IMAGE) -> Profile:
    """A complete, valid profile with realistic numbers (see the module docstring for their sources);
    `model_name` a preset, or the config of a checkpoint folder (`models.loading.model_config`)."""
    config = get_config(model_name) if isinstance(model_name, str) else model_name
    speeds = tuple(float(s) for s in device_speeds) if device_speeds is not None else (1.0,) * world_size
    if config.modality == "image":
        input_bytes_per_token = 4.0 * config.num_channels * config.patch_size**2  # float32 pixels
    else:
        input_bytes_per_token = 8.0  # int64 token id
    stage = (StagingTable(True, d2h_latency_s=5e-5, d2h_bandwidth_bps=40e9, h2d_latency_s=5e-5,
                          h2d_bandwidth_bps=40e9) if staging else StagingTable(False))
    return Profile(
        model=config, config_hash=config.config_hash(), world_size=len(speeds), device_speeds=speeds,
        host=HostFacts(cpu_model="synthetic 1-core", num_cores=1, torch_version="synthetic",
                       device_kind="cuda:synthetic" if staging else "cpu"),
        compute=synthetic_compute(config, seconds_per_image),
        staging=stage,
        link=LinkMeasurement(latency_s=latency_s, bandwidth_bps=bandwidth_bps, medium=medium,  # type: ignore[arg-type]
                             method="synthetic", emulation="wifi4-like"),
        energy=EnergyModel(source=energy_source, idle_w=2.0, compute_w=6.0, staging_w=3.0,  # type: ignore[arg-type]
                           network_w=1.5, meter="synthetic"),
        codecs=tuple(codecs) if codecs is not None else synthetic_codecs(config.exchange_width),
        input_bytes_per_token=input_bytes_per_token,
        output_bytes_per_row=4.0 * config.hidden_size if config.causal else 0.0,
        created_utc="1970-01-01T00:00:00Z", notes="synthetic profile for tests; not measured")


__all__ = ["VIT_B16_SECONDS_PER_IMAGE", "synthetic_codecs", "synthetic_compute", "synthetic_profile"]
