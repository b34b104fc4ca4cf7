"""What sealing the data lanes costs (edgeprism.comm.sealing), measured once per codec and kept in the profile.

For each profiled codec, one layer message of the profile's reference request (batch 1, the model's
`max_positions` tokens split over the profile's ranks by speed) is sealed and opened `repeats` times on
this device: `SealingSample(codec, message_bytes, seconds)` (the median of seal + open). A least-squares
line through the samples gives `per_message_s` and `per_byte_s`; the cost model charges, when the lanes
are sealed (`LinkEstimate.sealed`), `OVERHEAD_BYTES` more on every message and, per layer, one seal and
k - 1 opens on each rank as staging time (edgeprism.plan.cost).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edgeprism.comm.sealing import OVERHEAD_BYTES, LaneSealer, lane_key
from edgeprism.profile.tables import check_nonneg


@dataclass(frozen=True)
class SealingSample:
    """One codec's layer message: its size and the seconds to seal and open it once."""

    codec: str
    message_bytes: int
    seal_open_s: float


@dataclass(frozen=True)
class SealingCost:
    """The cost of sealed lanes on the profiled device: a fixed part per message and a part per byte."""

    overhead_bytes: int
    """Bytes sealing adds to every message (nonce and tag)."""
    per_message_s: float
    per_byte_s: float
    samples: tuple[SealingSample, ...] = ()
    method: str = ""

    def __post_init__(self) -> None:
        check_nonneg("sealing", overhead_bytes=self.overhead_bytes, per_message_s=self.per_message_s,
                     per_byte_s=self.per_byte_s)

    def seconds(self, num_messages: float, num_bytes: float) -> float:
        return self.per_message_s * num_messages + self.per_byte_s * num_bytes


def fit_sealing(samples: Sequence[SealingSample], method: str) -> SealingCost:
    """The least-squares line seconds = a + b · bytes through the samples (a, b clipped at 0)."""
    if not samples:
        raise ValueError("no sealing samples to fit")
    xs = [float(s.message_bytes) for s in samples]
    ys = [s.seal_open_s for s in samples]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread > 0 else mean_y / max(mean_x, 1)
    slope = max(slope, 0.0)
    intercept = max(mean_y - slope * mean_x, 0.0)
    return SealingCost(OVERHEAD_BYTES, intercept, slope, tuple(samples), method)


def codec_messages(codecs: Sequence, num_tokens: int, world_size: int) -> dict[str, int]:
    """Each profiled codec's layer message at batch 1 for a rank owning its even share of `num_tokens`."""
    own = max(1, num_tokens // max(world_size, 1))
    return {c.codec: round(c.wire_bytes_per_row + c.wire_bytes_per_token * own) for c in codecs}


def measure_sealing(message_bytes: dict[str, int], repeats: int = 20) -> SealingCost:
    """Seal and open a message of each codec's size `repeats` times (median): the profile's sealing cost."""
    if repeats < 1:
        raise ValueError(f"repeats {repeats} must be >= 1")
    key = lane_key(b"profile-sealing-cost", b"\0" * 16, 0, (0, 1))
    samples = []
    for codec, size in message_bytes.items():
        sender, receiver = LaneSealer(key, 1), LaneSealer(key, 0)
        payload = torch.randint(0, 256, (max(int(size), 1),), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(0))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            receiver.open(sender.seal(payload, "layer"), 1, "layer")
            times.append(time.perf_counter() - start)
        samples.append(SealingSample(codec, int(size), statistics.median(times)))
    return fit_sealing(samples, f"ChaCha20-Poly1305 seal + open, median of {repeats}, on this device")


__all__ = ["SealingCost", "SealingSample", "codec_messages", "fit_sealing", "measure_sealing"]
