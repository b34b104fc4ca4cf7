#!/usr/bin/env python
"""Fidelity of the ~8x codecs, worst of 5 draws, on MiniLM passages, intent queries and a held-out domain.

    nice -n 19 python scripts/bench_fidelity_calibrated.py                 # rows + tables.md
    python scripts/bench_fidelity_calibrated.py --tables-only

Every value is measured on the real distributed path (PositionWise over the loopback group, 2 ranks,
equal shares). Sets (none used for any choice but the calibration pool):
- passages: the first 200 Shakespeare passages of 128-256 tokens (`text_passages`, as `edgeprism eval`);
- queries: the intent queries shipped with the CLINC150 head;
- held-out: paragraphs of Debian's software licenses (tests/fixtures/heldout_licenses.txt), a domain
  nobody tuned on.
The calibration pool is passages 200+ of the same generator (disjoint from the evaluated 200); a calibration
request list is each sampled passage, then up to `--short-per-passage` of its own short sentences
and its share of the committed everyday sentences (`evaluate.calibration_text`; `--short-per-passage 0
--no-everyday`: passages only, the rule before).

A draw is what is random in a codec: for the seeded-rotation codecs (`lb4o4r`, the delta codec) the
rotation seed (the shipped seed, then 1-4); for the calibrated codec (`tc:`) the calibration sample
(`--calib-passages` passages drawn from the pool with seeds 0-4; the fit itself is deterministic).
Per (codec, set): bytes vs fp32, mean pooled cosine (worst draw), intent top-1 agreement and flips
(worst draw), retrieval top-1 agreement (each item's nearest other item of the set), and the items whose
single-device answer is a near tie (top-2 margin < 0.01: softmax probability for intents, cosine for
retrieval) beside every agreement figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "fidelity-calibrated"
HELDOUT = REPO_ROOT / "tests" / "fixtures" / "heldout_licenses.txt"
BASELINES = ("delta:lb4o4r:lb4o4r:lb3o4r*3:lb4o4r",)
NEAR_TIE = 0.01
WORLD_SIZE = 2


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_sets(limit: int, batch_size: int):
    from edgeprism import assets
    from edgeprism.assets.datasets import short_queries, text_passages
    from edgeprism.evaluate.eval_sets import _pad_batches
    from edgeprism.models.loading import load_model

    model = load_model("minilm-l6", assets.minilm_checkpoint_dir())
    tokenizer = assets.minilm_tokenizer(max_length=256)
    passages = text_passages(tokenizer, 128, 256, limit=None)
    heldout = [line for line in HELDOUT.read_text().splitlines() if line and not line.startswith("#")]
    texts = {"passages": passages[:limit], "queries": short_queries("intent"), "heldout": heldout[:limit]}
    sets = {name: _pad_batches([e.ids for e in tokenizer.encode_batch(t)], batch_size) for name, t in texts.items()}
    pool_texts = passages[limit:]
    lengths = [len(e.ids) for e in tokenizer.encode_batch(pool_texts)]
    pool = [pool_texts[i] for i in sorted(range(len(pool_texts)), key=lambda i: lengths[i])]  # as _pad_batches orders
    return model, assets.intent_head(), sets, pool, tokenizer


def embeddings(outputs) -> torch.Tensor:
    return F.normalize(torch.cat([o["mean"] for o in outputs]), dim=-1)  # (N, 384)


def answers(ref: torch.Tensor, head) -> dict:
    """What the single device answers, and which items are near ties."""
    probs = head.logits(ref).softmax(-1)
    top = probs.topk(2, dim=-1).values
    sim = ref @ ref.T - 2 * torch.eye(ref.shape[0])  # an item is not its own neighbour
    sim_top = sim.topk(2, dim=-1).values
    return {"intent": probs.argmax(-1), "intent_ties": int((top[:, 0] - top[:, 1] < NEAR_TIE).sum()),
            "nearest": sim.argmax(-1), "nearest_ties": int((sim_top[:, 0] - sim_top[:, 1] < NEAR_TIE).sum())}


def score(ref: torch.Tensor, got: torch.Tensor, reference: dict, head, guard_margin: float) -> dict:
    from edgeprism.evaluate.fidelity import label_shift, top2_margins

    logits = head.logits(got)
    intent = logits.argmax(-1)
    margins = top2_margins(logits)
    flipped = (intent != reference["intent"]).nonzero().flatten().tolist()
    # The near-tie guard (runtime/guard.py): rows answered with a margin under guard_margin are rerun on one
    # device, whose answer is the reference's.
    rerun = margins < guard_margin
    guarded = torch.where(rerun, reference["intent"], intent)
    nearest = (got @ got.T - 2 * torch.eye(got.shape[0])).argmax(-1)
    cosine = (ref * got).sum(-1)
    return {"cosine_mean": float(cosine.mean()), "cosine_item_min": float(cosine.min()),
            "intent_agreement": float((intent == reference["intent"]).float().mean()),
            "intent_flips": len(flipped), "flipped_margins": [round(float(margins[i]), 4) for i in flipped],
            "label_shift": label_shift(head.logits(ref), logits).value, "guard_margin": guard_margin,
            "guard_rows": int(rerun.sum()),
            "guarded_intent_agreement": float((guarded == reference["intent"]).float().mean()),
            "guarded_intent_flips": int((guarded != reference["intent"]).sum()),
            "retrieval_agreement": float((nearest == reference["nearest"]).float().mean()),
            "retrieval_flips": int((nearest != reference["nearest"]).sum())}


def seeded_rotation(name: str, seed: int | None, hidden_size: int):
    """The codec `name` with its low-bit formats' rotation drawn from `seed` (None: the shipped rotation)."""
    from edgeprism.compress import get_codec
    from edgeprism.compress.lowbit import LowBitFormat, rotation_matrix

    codec = get_codec(name)
    if seed is not None:
        formats = [getattr(codec, "values", None), getattr(codec, "first", None), getattr(codec, "rest", None),
                   *getattr(codec, "schedule", ())]
        for fmt in formats:
            if isinstance(fmt, LowBitFormat) and fmt.rotate:
                fmt._rotation[hidden_size] = rotation_matrix(hidden_size, seed)  # the format's own cache
    return codec


def run(args) -> list[dict]:
    from edgeprism.compress.calibrated_state import save
    from edgeprism.evaluate.calibrated import calibrate_codec
    from edgeprism.evaluate.calibration_text import calibration_texts, everyday_sentences
    from edgeprism.evaluate.eval_sets import _pad_batches
    from edgeprism.evaluate.fidelity import fp32_exchange_bytes, label_shift, run_distributed
    from edgeprism.runtime.guard import GUARD_HEADROOM

    torch.manual_seed(0)
    model, head, sets, pool, tokenizer = load_sets(args.limit, args.batch_size)
    d = model.config.hidden_size
    with torch.no_grad():
        refs = {name: embeddings([model(b) for b in batches]) for name, batches in sets.items()}
    reference = {name: answers(ref, head) for name, ref in refs.items()}
    full = {name: fp32_exchange_bytes(model, batches, WORLD_SIZE) for name, batches in sets.items()}
    # The guard's dev set (what a profile's evaluation would measure the codec's label shift on; none of the
    # evaluated sets): the last 40 pool passages and the everyday file's dev sentences.
    dev_texts = pool[-40:] + everyday_sentences("dev")
    dev = _pad_batches([e.ids for e in tokenizer.encode_batch(dev_texts)], args.batch_size)
    with torch.no_grad():
        dev_ref = head.logits(embeddings([model(b) for b in dev]))
    draws: list[tuple[str, str, object]] = []
    for name in args.baselines:
        draws += [(name, f"rotation seed {seed if seed is not None else 'shipped'}",
                   lambda name=name, seed=seed: seeded_rotation(name, seed, d)) for seed in (None, 1, 2, 3, 4)][:args.draws]

    def calibrated(seed: int):
        chosen = sorted(random.Random(seed).sample(range(len(pool)), args.calib_passages))
        extra = () if args.no_everyday else everyday_sentences("calibration")
        texts = calibration_texts([pool[i] for i in chosen], tokenizer, args.short_per_passage, extra=extra)
        batches = [_pad_batches([ids], 1)[0] for ids in (e.ids for e in tokenizer.encode_batch(texts))]
        start = time.perf_counter()
        codec = calibrate_codec(model, batches, WORLD_SIZE, ratio=args.ratio, error=args.error,
                                description=f"minilm-l6 w2, {args.calib_passages} pool passages + "
                                            f"{len(texts) - args.calib_passages - len(extra)} of their short sentences + "
                                            f"{len(extra)} everyday sentences, "
                                            f"sample seed {seed}, {args.error} error")
        log(f"calibrated {codec.name} (sample seed {seed}) in {time.perf_counter() - start:.1f} s -> {save(codec)}")
        return codec

    if not args.no_calibrated:
        draws += [(f"tc (calibrated, {args.error} error)", f"calibration sample seed {seed}",
                   lambda seed=seed: calibrated(seed))
                  for seed in range(args.draws)]
    rows = []
    for family, draw, make in draws:
        codec = make()
        dev_outputs, _ = run_distributed(model, dev, codec, WORLD_SIZE)
        dev_shift = label_shift(dev_ref, head.logits(embeddings(dev_outputs))).value
        margin = args.guard_margin if args.guard_margin is not None else min(0.999, GUARD_HEADROOM * dev_shift)
        log(f"{codec.name} [{draw}]: label shift on the guard's dev set ({len(dev_texts)} texts) {dev_shift:.4f} "
            f"-> guard margin {margin:.4f}")
        for set_name, batches in sets.items():
            outputs, nbytes = run_distributed(model, batches, codec, WORLD_SIZE)
            row = {"family": family, "codec": codec.name, "draw": draw, "set": set_name, "items": len(refs[set_name]),
                   "x_vs_fp32": full[set_name] / nbytes, "intent_near_ties": reference[set_name]["intent_ties"],
                   "retrieval_near_ties": reference[set_name]["nearest_ties"], "guard_dev_shift": dev_shift,
                   **score(refs[set_name], embeddings(outputs), reference[set_name], head, margin)}
            rows.append(row)
            log(f"{codec.name} [{draw}] {set_name}: {row['x_vs_fp32']:.2f}x cos {row['cosine_mean']:.5f} intent "
                f"{row['intent_agreement']:.3f} ({row['intent_flips']} flips at margins {row['flipped_margins']}) "
                f"guarded {row['guarded_intent_agreement']:.3f} ({row['guard_rows']} rows rerun; label shift "
                f"{row['label_shift']:.4f}) retrieval {row['retrieval_agreement']:.3f}")
    return rows


def write_tables(rows: list[dict], path: Path, command: str) -> None:
    out = ["# Fidelity of the ~8x codecs: worst of 5 draws (MiniLM-L6, 2 ranks)", "",
           "Generated by `scripts/bench_fidelity_calibrated.py` from `rows.jsonl` (docs/METHODOLOGY.md, "
           "\"Fidelity: worst of 5 draws\"). Command:", "", f"    {command}", "",
           "Per cell: worst draw over the draws run (cosine: lowest mean pooled cosine; agreement: lowest, with its",
           "flips), then `ties` = items whose single-device answer has a top-2 margin < 0.01 (a property of the set).",
           "× vs fp32: measured layer bytes of full fp32 exchange over the codec's (lowest over draws).", ""]
    sets = list(dict.fromkeys(r["set"] for r in rows))
    out += ["| codec | draws | " + " | ".join(
        f"{s}: × fp32 | {s}: cosine min | {s}: intent agr. worst (flips; ties) | {s}: retrieval agr. worst (flips; ties)"
        for s in sets) + " |", "|---|---|" + "---|---|---|---|" * len(sets)]
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == family]
        cells = []
        for s in sets:
            cell = [r for r in mine if r["set"] == s]
            worst_i = min(cell, key=lambda r: (r["intent_agreement"], -r["intent_flips"]))
            worst_r = min(cell, key=lambda r: (r["retrieval_agreement"], -r["retrieval_flips"]))
            cells.append(f"{min(r['x_vs_fp32'] for r in cell):.2f} | {min(r['cosine_mean'] for r in cell):.5f} | "
                         f"{worst_i['intent_agreement']:.3f} ({worst_i['intent_flips']}/{worst_i['items']}; "
                         f"{worst_i['intent_near_ties']}) | {worst_r['retrieval_agreement']:.3f} "
                         f"({worst_r['retrieval_flips']}/{worst_r['items']}; {worst_r['retrieval_near_ties']})")
        names = sorted({r["codec"] for r in mine})
        label = family if len(names) == 1 else f"{family}: {', '.join(names)}"
        out.append(f"| `{label}` | {len({r['draw'] for r in mine})} | " + " | ".join(cells) + " |")
    guarded = [r for r in rows if "guarded_intent_agreement" in r]
    if guarded:
        out += ["", "With the near-tie guard (runtime/guard.py; rows from runs that measured it): intent rows the "
                "split answered with a top-2 probability margin under the guard's are rerun on one device. The "
                "guard's margin per draw is 1.5 × the codec's label shift (largest change of two labels' "
                "probability difference) on the guard's dev set — 40 pool passages and the everyday dev sentences, "
                "none of the evaluated sets — as a profile sets it. Per cell: worst draw's agreement with the guard "
                "(flips), the most rows rerun in a draw, the largest label shift on the set (any draw), and the "
                "margins the split answered its flipped items with (all draws).", "",
                "| codec | guard margin (draws) | " + " | ".join(
                    f"{s}: agr. worst with guard (flips) | {s}: rows rerun, most | {s}: label shift, largest | "
                    f"{s}: flipped at margin" for s in sets) + " |", "|---|---|" + "---|---|---|---|" * len(sets)]
        for family in dict.fromkeys(r["family"] for r in guarded):
            mine = [r for r in guarded if r["family"] == family]
            margins = [r["guard_margin"] for r in mine]
            cells = []
            for s in sets:
                cell = [r for r in mine if r["set"] == s]
                if not cell:
                    cells.append(" | | | ")
                    continue
                worst = min(cell, key=lambda r: (r["guarded_intent_agreement"], -r["guarded_intent_flips"]))
                flipped = sorted(m for r in cell for m in r["flipped_margins"])
                items = worst["items"]
                cells.append(f"{worst['guarded_intent_agreement']:.3f} ({worst['guarded_intent_flips']}/{items}) | "
                             f"{max(r['guard_rows'] for r in cell)}/{items} | "
                             f"{max(r['label_shift'] for r in cell):.4f} | "
                             + (", ".join(f"{m:.4f}" for m in flipped) or "—"))
            out.append(f"| `{family}` | {min(margins):.4f}–{max(margins):.4f} | " + " | ".join(cells) + " |")
    out += ["", "Per draw (intent flips per set):", "", "| codec | draw | " + " | ".join(sets) + " |",
            "|---|---|" + "---|" * len(sets)]
    for (codec, draw) in dict.fromkeys((r["codec"], r["draw"]) for r in rows):
        by_set = {r["set"]: r for r in rows if r["codec"] == codec and r["draw"] == draw}
        out.append(f"| `{codec}` | {draw} | " + " | ".join(
            f"{by_set[s]['intent_flips']} (cos {by_set[s]['cosine_mean']:.5f})" if s in by_set else "" for s in sets) + " |")
    path.write_text("\n".join(out) + "\n")


def write_fidelity_rows(rows: list[dict], path: Path) -> None:
    """The rows in the `edgeprism eval --out` format, one per (codec, set, metric), for `edgeprism profile
    --fidelity FILE` (the profile keeps each codec's worst row; tc: codecs need their state file there too)."""
    from edgeprism.partition.transform import DEFAULT_AVERAGE, DEFAULT_SIZE_AWARE

    with path.open("w") as handle:
        for r in rows:
            for metric, key in (("pooled_cosine", "cosine_mean"), ("top1_agreement", "intent_agreement")):
                handle.write(json.dumps({"eval_set": f"minilm-{r['set']}", "model": "minilm-l6", "codec": r["codec"],
                                         "world_size": WORLD_SIZE, "size_aware": DEFAULT_SIZE_AWARE,
                                         "average": DEFAULT_AVERAGE, "metric": metric, "value": r[key],
                                         "reference_value": 1.0, "num_requests": r["items"]}) + "\n")


def main() -> None:
    from edgeprism.evaluate.calibration_text import SHORT_PER_PASSAGE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=200, help="items per set (passages, held-out)")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--calib-passages", type=int, default=60, help="pool passages per calibration sample")
    parser.add_argument("--short-per-passage", type=int, default=SHORT_PER_PASSAGE,
                        help="calibrated codec: short sentences of each passage mixed in (0: passages only)")
    parser.add_argument("--no-everyday", action="store_true",
                        help="calibrated codec: leave out the everyday sentences (evaluate.calibration_text)")
    parser.add_argument("--ratio", type=float, default=8.0, help="calibrated codec: x less than fp32 per token")
    parser.add_argument("--error", choices=("kv", "hidden"), default="kv",
                        help="calibrated codec: fit against the receiver's K/V error (kv) or the vector's (hidden)")
    parser.add_argument("--guard-margin", type=float, default=None,
                        help="near-tie guard: intent rows answered with a top-2 margin under this are rerun on one "
                             "device (runtime/guard.py); default: per draw, GUARD_HEADROOM x the codec's label shift "
                             "on the guard's dev set, as a profile sets it; reported beside the unguarded agreement")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--baselines", default=",".join(BASELINES), type=lambda s: [x for x in s.split(",") if x])
    parser.add_argument("--no-calibrated", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--tables-only", action="store_true")
    args = parser.parse_args()
    record(args, "bench_fidelity_calibrated.py", run, write_tables)
    write_fidelity_rows([json.loads(line) for line in (Path(args.out_dir) / "rows.jsonl").read_text().splitlines()
                         if line.strip()], Path(args.out_dir) / "fidelity-rows.jsonl")


def record(args, script: str, run, write_tables) -> None:
    """Run `run(args)` (unless --tables-only), append its rows with the run's facts to `<out-dir>/rows.jsonl`, and
    write `tables.md` from every row there (also used by scripts/bench_guard_probe.py)."""
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_path = out_dir / "rows.jsonl"
    command = f"python scripts/{script} " + " ".join(sys.argv[1:])
    if not args.tables_only:
        common = {"torch_version": torch.__version__, "threads": args.threads,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_1min": round(os.getloadavg()[0], 2),
                  "command": command}
        with rows_path.open("a") as handle:
            for row in run(args):
                handle.write(json.dumps({**common, **row}) + "\n")
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    write_tables(rows, out_dir / "tables.md", rows[-1].get("command", command) if rows else command)
    log(f"wrote {out_dir / 'tables.md'}")


if __name__ == "__main__":
    main()
