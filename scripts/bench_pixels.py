"""The scatter's levels wire form (compress/pixels.py, partition/scatter.py) measured: bytes and seconds (a printout,
not a test). For a ViT's synthetic 8-bit images, per batch and world size: the bytes rank 0 sends the other ranks
as float32 and as levels, rank 0's encode (every other rank's part, `PositionWise.split`) and one receiver's
decode (`PositionWise._scatter`), medians over --repeats on one thread (one emulated device's core); then, for the
largest batch, the exact methods considered for finding each channel's levels, so the choice can be rechecked.

    python scripts/bench_pixels.py                                  # ViT-B/16 224 px, batches 1,8, worlds 2,4
    python scripts/bench_pixels.py --model dinov2-s14 --batches 1,8,32 --worlds 2,3,4
    python scripts/bench_pixels.py --model dinov2-s14 --data fashion-mnist --image-size 224   # the demo's images

Prints the host load before and after: a busy host makes every time longer (the byte counts are exact).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from edgeprism.assets.datasets import fashion_mnist, to_dinov2_input
from edgeprism.compress.base import pack, spec_nbytes, unpack
from edgeprism.models.loading import build_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.partition.ranges import equal_shares, split_tokens
from edgeprism.partition.scatter import part_wire_spec, read_part, wire_part, wire_tensors


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _encode_all(model, parts: list) -> list:
    """Rank 0's work in `PositionWise.split`: every other rank's part in its wire form."""
    return [wire_part(model, part) for part in parts]


def _decode(spec: dict, payload: torch.Tensor):
    """A receiver's work in `PositionWise._scatter`: the packed message back to its part."""
    return read_part(spec, unpack(payload, part_wire_spec(spec)))


def _methods(values: torch.Tensor, channels: int) -> dict[str, Callable[[], object]]:
    """Exact ways to find a part's levels per channel (codes = the inverse indices)."""
    per_channel = values.reshape(-1, channels, values.shape[-1] // channels)  # (N, C, K)
    bits = per_channel.view(torch.int32)

    def sampled_palette():  # a palette from the first rows, then every value looked up (and checked)
        out = []
        for c in range(channels):
            palette = torch.unique(per_channel[:16, c])
            index = torch.searchsorted(palette, per_channel[:, c].contiguous()).clamp_max(palette.numel() - 1)
            out.append(bool(torch.equal(palette[index], per_channel[:, c])))
        return out

    return {
        "unique over float32 (sorted)": lambda: [torch.unique(per_channel[:, c], return_inverse=True)
                                                 for c in range(channels)],
        "unique over float32 (sorted=False)": lambda: [torch.unique(per_channel[:, c], sorted=False,
                                                                    return_inverse=True) for c in range(channels)],
        "sampled palette + searchsorted": sampled_palette,
        "unique over the int32 bit view (kept)": lambda: [torch.unique(bits[:, c], return_inverse=True)
                                                          for c in range(channels)],
    }


def _inputs(model, data: str, batch: int, image_size: int | None) -> dict[str, torch.Tensor]:
    """Synthetic 8-bit images, or Fashion-MNIST test images as the DINOv2 demo sends them (`to_dinov2_input`)."""
    if data == "synthetic":
        return synthetic_inputs(model.config, batch, image_size=image_size, seed=batch)
    images, _ = fashion_mnist("test", limit=batch)
    return {"pixel_values": to_dinov2_input(images, image_size or 224)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-base-patch16-224")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--data", choices=("synthetic", "fashion-mnist"), default="synthetic")
    parser.add_argument("--image-size", type=int, default=None, help="pixels (default: the model's; 224 for "
                        "fashion-mnist)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: one emulated device's core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.model)
    channels = model.pixel_channels()
    if not channels:
        raise SystemExit(f"{args.model} declares no pixel parts (ReferenceModel.pixel_channels): nothing to measure")
    print(f"load before: {os.getloadavg()}  threads={args.threads}  model={args.model}  data={args.data}")
    print(f"{'batch':>5} {'world':>5} {'float32 B':>11} {'levels B':>10} {'ratio':>6} {'encode ms':>10} "
          f"{'decode ms':>10}")
    batches = [int(b) for b in args.batches.split(",")]
    for batch in batches:
        inputs = _inputs(model, args.data, batch, args.image_size)
        num_tokens = model.validate_input(inputs)
        for world in (int(w) for w in args.worlds.split(",")):
            ranges = split_tokens(num_tokens, equal_shares(world))
            parts = [model.split_input(inputs, r.start, r.end) for r in ranges]
            wired = [wire_part(model, part) for part in parts[1:]]
            raw = sum(v.numel() * v.element_size() for part in parts[1:] for v in part.values())
            sent = sum(spec_nbytes(part_wire_spec(spec)) for spec, _ in wired)
            spec, wire = wired[-1]  # the last rank's part: what one receiver reads
            payload = pack(wire_tensors(spec, wire))
            encode_ms = _median_ms(partial(_encode_all, model, parts[1:]), args.repeats)
            decode_ms = _median_ms(partial(_decode, spec, payload), args.repeats)
            print(f"{batch:>5} {world:>5} {raw:>11} {sent:>10} {sent / raw:>6.3f} {encode_ms:>10.2f} "
                  f"{decode_ms:>10.2f}")
    batch = max(batches)
    inputs = _inputs(model, args.data, batch, args.image_size)
    num_tokens = model.validate_input(inputs)
    half = split_tokens(num_tokens, equal_shares(2))[1]
    key, count = next(iter(channels.items()))
    values = model.split_input(inputs, half.start, half.end)[key]
    print(f"\nfinding the levels of one part ({key} {tuple(values.shape)}, {values.numel()} values, batch {batch}):")
    for name, fn in _methods(values, count).items():
        print(f"  {name:<40} {_median_ms(fn, args.repeats):8.2f} ms")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
