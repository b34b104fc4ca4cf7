"""Staging profiling: device→CPU and CPU→device copy time against bytes, as every GLOO exchange pays it.

On a CPU-only host there is nothing to stage (GLOO reads the tensors where they are): the table is
`present=False`, and the report says so. On a GPU the copies are timed for real, into and out of
pinned buffers (what `comm.exchange.Exchanger` uses) and pageable ones (for comparison), and fitted
to seconds = latency_s + 8 · nbytes / bandwidth_bps.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edgeprism.profile.schema import StagingSample, StagingTable

log = logging.getLogger(__name__)

DEFAULT_SIZES = tuple(1 << k for k in range(12, 27, 2))
"""4 KiB … 64 MiB in steps of 4×: a small exchange of one request up to a large batch's fp32 layer."""


@dataclass(frozen=True)
class CopyFit:
    direction: str
    """"d2h" or "h2d"."""
    pinned: bool
    latency_s: float
    bandwidth_bps: float
    samples: tuple[StagingSample, ...]

    def __str__(self) -> str:
        return (f"{self.direction} {'pinned' if self.pinned else 'pageable'}: {self.latency_s * 1e6:.1f} us + "
                f"{self.bandwidth_bps / 8e9:.2f} GB/s")


@dataclass(frozen=True)
class StagingReport:
    """What was measured: the table for the profile (pinned, as the runtime copies) and every fit."""

    table: StagingTable
    fits: tuple[CopyFit, ...]
    note: str

    def to_dict(self) -> dict:
        return {"present": self.table.present, "note": self.note,
                "fits": [{"direction": f.direction, "pinned": f.pinned, "latency_s": f.latency_s,
                          "bandwidth_bps": f.bandwidth_bps} for f in self.fits]}


def fit_copy(samples: Sequence[StagingSample]) -> tuple[float, float]:
    """Least squares seconds = latency_s + 8·nbytes / bandwidth_bps → (latency_s >= 0, bandwidth_bps > 0)."""
    import numpy as np

    x = np.array([s.nbytes for s in samples], dtype=float)
    y = np.array([s.seconds for s in samples], dtype=float)
    slope, intercept = np.polyfit(x, y, 1) if len(samples) >= 2 and np.ptp(x) > 0 else (y.mean() / x.mean(), 0.0)
    if intercept < 0:  # through the origin
        slope, intercept = float((x @ y) / (x @ x)), 0.0
    slope = max(float(slope), 1e-15)
    return float(intercept), 8.0 / slope


def time_copy(nbytes: int, direction: str, pinned: bool, device: torch.device, repeats: int = 5) -> float:
    """Median seconds of one copy of `nbytes` between `device` and a (pinned or pageable) host buffer."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src, dst = (dev, host) if direction == "d2h" else (host, dev)
    dst.copy_(src, non_blocking=pinned)  # warm-up
    torch.cuda.synchronize(device)
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=pinned)
        torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure_staging(device: torch.device, sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 5,
                    ) -> StagingReport:
    """Staging copies on `device`; a CPU device has none (zero, and the report says so)."""
    if device.type != "cuda":
        note = (f"device {device} is the CPU: exchanges need no device<->host staging, so staging is 0 "
                "(not measured)")
        return StagingReport(StagingTable(present=False), (), note)
    if not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available on this host")
    fits = []
    for pinned in (True, False):
        for direction in ("d2h", "h2d"):
            samples = tuple(StagingSample(direction, n, time_copy(n, direction, pinned, device, repeats))
                            for n in sizes)
            latency_s, bandwidth_bps = fit_copy(samples)
            fits.append(CopyFit(direction, pinned, latency_s, bandwidth_bps, samples))
    d2h, h2d = fits[0], fits[1]  # pinned: what the runtime's Exchanger copies through
    table = StagingTable(present=True, d2h_latency_s=d2h.latency_s, d2h_bandwidth_bps=d2h.bandwidth_bps,
                         h2d_latency_s=h2d.latency_s, h2d_bandwidth_bps=h2d.bandwidth_bps,
                         samples=d2h.samples + h2d.samples)
    note = (f"measured on {torch.cuda.get_device_name(device)}: " + "; ".join(str(f) for f in fits)
            + " (the profile uses pinned, as the runtime stages)")
    log.info("staging: %s", note)
    return StagingReport(table, tuple(fits), note)


__all__ = ["DEFAULT_SIZES", "CopyFit", "StagingReport", "fit_copy", "measure_staging", "time_copy"]
