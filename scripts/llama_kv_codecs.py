"""Codecs on a Llama decoder's exchanged keys/values, against one device, on held-out Shakespeare.

SmolLM2-135M (the folder `make assets` writes), 2 ranks with equal shares, windows of 512 tokens from The
Tempest. The exchange runs in one process through `calibrate.emulate` (the same per-layer code as
`PositionWise`; tests/test_calibrate.py holds them equal). Next-token agreement is over rank 1's positions
(the only ones an exchange can change); perplexity over every position; bytes are one request's layer
messages (`codec.nbytes` at the model's exchange width).

    PYTHONPATH=src python scripts/llama_kv_codecs.py --windows 6 --codecs fp16,int8,int8c,sm2,sm4,sm2a,sm4a
"""

from __future__ import annotations

import argparse
import gzip
import math

import torch
import torch.nn.functional as F

from edgeprism.assets import TEXT_DIR, cache_dir
from edgeprism.calibrate.emulate import emulate
from edgeprism.compress.registry import get_codec
from edgeprism.models.loading import load_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--codecs", default="fp16,int8,int8c,sm2,sm4,sm2a,sm4a,sm4a+int8,sm16a")
    args = parser.parse_args()
    from tokenizers import Tokenizer  # ships with transformers

    folder = cache_dir() / "smollm2-135m"
    model = load_pretrained(folder, "smollm2-135m")
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(
        gzip.open(TEXT_DIR / "tempest.txt.gz", "rt").read()).ids
    T = args.seq_len
    windows = [torch.tensor([ids[5000 + i * T: 5000 + (i + 1) * T]]) for i in range(args.windows)]
    positions = sum(x.shape[1] - 1 for x in windows)

    def nll(logits: torch.Tensor, x: torch.Tensor) -> float:
        return F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()

    with torch.no_grad():
        references = [model.logits(model({"input_ids": x})["hidden"]) for x in windows]
        base = math.exp(sum(nll(r, x) for r, x in zip(references, windows)) / positions)
        print(f"one device: perplexity {base:.3f} over {positions} positions")
        for name in args.codecs.split(","):
            codec, agree, total, loss = get_codec(name), 0, 0, 0.0
            for x, ref in zip(windows, references):
                logits = model.logits(emulate(model, {"input_ids": x}, codec, 2)["hidden"])
                agree += int((logits[0, T // 2:].argmax(-1) == ref[0, T // 2:].argmax(-1)).sum())
                total += T - T // 2
                loss += nll(logits, x)
            ppl = math.exp(loss / positions)
            nbytes = codec.nbytes(1, T // 2, model.config.exchange_width) * model.config.num_layers
            print(f"{name:10s} agreement {agree / total:.4f}  perplexity {ppl:.3f} ({ppl / base - 1:+.2%})  "
                  f"bytes/request {nbytes}", flush=True)


if __name__ == "__main__":
    main()
