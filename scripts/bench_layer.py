"""Where one layer's compute goes on one rank of a P-way split (default 2), against 1/P of one device's layer (a
printout, not a test; one process, one thread, no link): issue 16 item 3, "find where the extra compute at batch 1
goes", and issue 17's question of what a 4-way split costs each rank.

    python scripts/bench_layer.py [--model vit-base-patch16-224] [--codec int8] [--batch 1] [--repeats 40] [--ranks 2]

Times, interleaved and each the median of --repeats: the reference block over all N tokens (one device's layer),
the block over a rank's n = ceil(N/P) own tokens with the others as keys/values (what the profile's compute table
measures for a full-exchange split), and the overlapped split's steps one by one (what it sends: LN; the codec's
encode + pack; the own-key part: Q/K/V projections and attention; unpack + decode; the rest: the received
vectors' K/V projection, their attention part, the merge, the output projection and the MLP). Prints each in ms
and as a share of the split layer's excess over 1/P of one device's layer, with the host load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from edgeprism.compress.base import pack, unpack
from edgeprism.compress.registry import get_codec
from edgeprism.models.loading import load_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.partition.attend import own_key_bias, remote_key_bias
from edgeprism.partition.overlap import OwnPart, attention_part, merge_parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-base-patch16-224")
    parser.add_argument("--codec", default="int8")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--ranks", type=int, default=2, help="P: the rank timed owns ceil(N/P) tokens")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per device, as on the testbed
    model = load_model(args.model, seed=0)
    codec = get_codec(args.codec)
    block = model.block_list()[0]
    with torch.no_grad():
        inputs = synthetic_inputs(model.config, args.batch, seed=0)
        full = model.embed(inputs, 0, model.validate_input(inputs))  # (B, N, d)
    batch, num_tokens, d = full.shape
    if not 2 <= args.ranks <= num_tokens:
        raise SystemExit(f"--ranks must be in 2..{num_tokens} (the tokens), got {args.ranks}")
    num_own = -(-num_tokens // args.ranks)
    own, other = full[:, :num_own], full[:, num_own:]  # (B, n, d), (B, N - n, d)
    valid = torch.ones(batch, num_own, dtype=torch.bool)
    anchor = torch.zeros_like(valid)
    anchor[:, 0] = True
    own_bias = own_key_bias(valid, 0, num_own, False, full.dtype)
    wire_spec = codec.wire_spec(batch, num_tokens - num_own, d)
    with torch.no_grad():
        received = pack(codec.encode(block.kv_input(other), torch.ones(batch, num_tokens - num_own, dtype=torch.bool)))

    marks_box: list[float] = []

    def split_layer():  # the overlapped path's steps, each timed
        marks = [time.perf_counter()]
        sent = block.kv_input(own)
        marks.append(time.perf_counter())
        pack(codec.encode(sent, valid, anchor))
        marks.append(time.perf_counter())
        part = OwnPart(block, sent, own_bias)
        marks.append(time.perf_counter())
        remote, counts = codec.decode(unpack(received, wire_spec))
        marks.append(time.perf_counter())
        k_r, v_r = block.attn.project_kv(remote)
        marks.append(time.perf_counter())
        other_part = attention_part(part.q, k_r, v_r, remote_key_bias(counts, True, full.dtype), block.attn.scale)
        heads = merge_parts(part.part, other_part)
        marks.append(time.perf_counter())
        block.after_attention(own, block.attn.project_out(heads))
        marks.append(time.perf_counter())
        marks_box[:] = marks

    names = ["LN (what is sent)", "encode + pack", "own part (QKV + attention)", "unpack + decode",
             "received K/V projection", "received attention + merge", "out proj + MLP"]
    times: dict[str, list[float]] = {k: [] for k in ["one device (N tokens)", "block n own + N-n kv", "split layer"]}
    step_times: dict[str, list[float]] = {k: [] for k in names}
    with torch.no_grad():
        for repeat in range(-3, args.repeats):
            for name in list(times)[repeat % 3:] + list(times)[:repeat % 3]:
                start = time.perf_counter()
                if name == "one device (N tokens)":
                    block(full)
                elif name == "block n own + N-n kv":
                    block(own, context=other)
                else:
                    split_layer()
                if repeat >= 0:
                    times[name].append(time.perf_counter() - start)
                    if name == "split layer":
                        marks = marks_box
                        for i, key in enumerate(names):
                            step_times[key].append(marks[i + 1] - marks[i])
    med = {k: statistics.median(v) * 1e3 for k, v in {**times, **step_times}.items()}
    half = med["one device (N tokens)"] / args.ranks
    excess = med["split layer"] - half
    print(f"{args.model} B={batch} N={num_tokens} n={num_own} codec {codec.name}, 1 thread, {args.repeats} repeats; "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for key in times:
        print(f"  {key:<28} {med[key]:7.2f} ms")
    print(f"  one device's layer / {args.ranks:<6} {half:7.2f} ms; "
          f"split layer excess {excess:+.2f} ms ({excess / half:+.0%})")
    for key in names:
        print(f"    {key:<28} {med[key]:7.2f} ms")


if __name__ == "__main__":
    main()
