#!/usr/bin/env python
"""Fidelity of the kv-share codecs (`kv<P>:<format>`) next to their every-token formats, on real weights.

    nice -n 19 python scripts/kvshare_fidelity.py --model minilm-l6 --limit 200 --world-size 2,4
    nice -n 19 python scripts/kvshare_fidelity.py --model dinov2-s14 --limit 200 --world-size 2,4

The rows are `edgeprism eval`'s own (`evaluate.fidelity.evaluate` over the model's evaluation sets: PositionWise
over the loopback group, default weighting, equal shares), written as `edgeprism eval --out` writes them, with
two additions per top-1 metric (intent agreement, probe top-1 agreement): `items` and `near_ties`, the items whose
single-device answer has a top-2 softmax margin < 0.01 (`evaluate.fidelity.NEAR_TIE_MARGIN`), and a second file
listing each codec's flipped items with their single-device margins (is a flip a near tie or a real change?).
Output: `<out-dir>/<model>.jsonl` (rows) and `<out-dir>/<model>-flips.jsonl`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edgeprism import assets
from edgeprism.evaluate.eval_sets import eval_sets_for, fashion_mnist_probe
from edgeprism.evaluate.fidelity import NEAR_TIE_MARGIN, evaluate, top2_margins

REPO_ROOT = Path(__file__).resolve().parents[1]
TOP1_METRICS = ("intent_agreement", "top1_agreement")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def answer_logits(model_name: str, model):
    """outputs of one batch -> the top-1 task's logits (B, classes): the intent head on the normalised mean
    embedding (MiniLM), the Fashion-MNIST probe on the pooled [CLS] feature (DINOv2)."""
    if model_name == "minilm-l6":
        head = assets.intent_head()
        return lambda out: head.logits(F.normalize(out["mean"], dim=-1))
    probe = fashion_mnist_probe(model)
    return lambda out: probe(out["pooled"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("minilm-l6", "dinov2-s14"), required=True)
    p.add_argument("--codec", default="int8,kv50:int8,kv100:int8,int4,kv50:int4,kv100:int4")
    p.add_argument("--world-size", default="2,4")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "kvshare")
    args = p.parse_args()
    codecs = [c.strip() for c in args.codec.split(",") if c.strip()]
    sets = eval_sets_for(args.model, limit=args.limit, progress=log)
    logits_of = answer_logits(args.model, sets[0].model)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows_path, flips_path = args.out_dir / f"{args.model}.jsonl", args.out_dir / f"{args.model}-flips.jsonl"
    for world in [int(w) for w in args.world_size.split(",")]:
        for eval_set in sets:
            flips: list[dict] = []
            with torch.no_grad():
                reference = torch.cat([logits_of(eval_set.model(b)) for b in eval_set.batches])  # (N, classes)
            margins = top2_margins(reference)
            ties = int((margins < NEAR_TIE_MARGIN).sum())
            score = eval_set.score

            def recording_score(ref_outputs, outputs, score=score, flips=flips, reference=reference, margins=margins):
                with torch.no_grad():
                    got = torch.cat([logits_of(o) for o in outputs]).argmax(-1)
                changed = (got != reference.argmax(-1)).nonzero().flatten().tolist()
                flips.append({"items": changed, "margins": [round(float(margins[i]), 5) for i in changed]})
                return score(ref_outputs, outputs)

            rows = evaluate(dataclasses.replace(eval_set, score=recording_score), codecs, world, progress=log)
            with rows_path.open("a") as f:
                for row in rows:
                    if row.metric in TOP1_METRICS:
                        row = dataclasses.replace(row, near_ties=ties, items=len(margins))
                    f.write(json.dumps(row.to_dict()) + "\n")
            with flips_path.open("a") as f:
                for codec, flipped in zip(codecs, flips):
                    f.write(json.dumps({"eval_set": eval_set.name, "codec": codec, "world_size": world,
                                        "near_ties": ties, "items": len(margins), "flipped": flipped["items"],
                                        "flipped_margins": flipped["margins"]}) + "\n")
            log(f"{eval_set.name} world {world}: done ({ties} near ties of {len(margins)})")


if __name__ == "__main__":
    main()
