"""Dynamic batching on a deployed cluster: throughput and latency under concurrent clients, with and without.

The testbed as stand-in boards (root): host 0 is the coordinator (this script re-runs itself there), host 1
a device (`edgeprism join`, the command of docs/DEPLOY.md), over a kernel-shaped link. The coordinator
serves the same engine twice over HTTP — one API with dynamic batching, one without — and the load
generator (`edgeprism.api.load`, in host 0's namespace) sends the same requests to each in turn,
alternating which goes first, `--repeats` times. Rows (one per run) go to OUT/rows-WORKLOAD.jsonl; the
table of medians, spreads and the batching/no-batching ratios to OUT/tables-WORKLOAD.md.

    python scripts/bench_http_batching.py --model minilm-l6 --checkpoint ~/.cache/edgeprism/minilm-l6 \\
        --profile P.json --link wifi4 --concurrency 8 --requests 48 --repeats 3 --out benchmarks/results/http-batching
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

from edgeprism.bench.testbed_pair import HOST0_ARGS, Host0, joined_pair, rerun_in_host0

HTTP_PORTS = {"batching": 8001, "no batching": 8002}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--profile", required=True, help="a profile of 2 devices (edgeprism profile --link ...)")
    p.add_argument("--link", default="wifi4")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=48, help="requests per run (one text each)")
    p.add_argument("--workload", choices=["passages", "queries"], default="passages",
                   help="passages: 128-250 tokens of Shakespeare each; queries: short questions (5-20 words)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-fidelity-loss", type=float, default=0.01)
    p.add_argument("--batch-window-ms", type=float, default=5.0)
    p.add_argument("--out", required=True)
    p.add_argument("--inner", nargs=len(HOST0_ARGS), metavar=HOST0_ARGS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def outer(args) -> int:
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return rerun_in_host0(__file__, sys.argv[1:], args.link)


def inner(args) -> int:
    import torch

    from edgeprism.api import ApiConfig, serve_http
    from edgeprism.api.auth import HttpAccess
    from edgeprism.api.load import LoadConfig, run_load
    from edgeprism.assets.datasets import short_queries, text_passages
    from edgeprism.inputs import load_io
    from edgeprism.profile.schema import Profile
    from edgeprism.runtime import EngineConfig

    host0 = Host0(*args.inner)
    address = host0.address
    profile = Profile.load(args.profile)
    config = EngineConfig(max_fidelity_loss=args.max_fidelity_loss, max_batch=32)
    with joined_pair(host0, args.model, profile, args.checkpoint, config, join_within_s=120) as engine:
        io = load_io(engine.model.config, args.checkpoint)
        stops = {}
        for mode, port in HTTP_PORTS.items():
            stops[mode] = threading.Event()
            api = ApiConfig(dynamic_batching=mode == "batching", batch_window_s=args.batch_window_ms / 1e3)
            threading.Thread(target=serve_http, args=(engine, io, address, port, api),
                             # open on purpose: only the load generator beside it in host 0's namespace reaches it
                             kwargs={"stop": stops[mode], "access": HttpAccess(insecure=True)}, daemon=True).start()
        time.sleep(2.0)
        if args.workload == "queries":
            texts = tuple(short_queries("shakespeare", limit=args.requests))
        else:
            texts = tuple(_passages(io, text_passages, args.requests))
        rows = []
        for mode in HTTP_PORTS:  # warm-up: every plan shape once
            asyncio.run(run_load(LoadConfig(f"http://{address}:{HTTP_PORTS[mode]}", concurrency=args.concurrency,
                                            requests=args.concurrency * 2, texts=texts[:args.concurrency * 2])))
        for repeat in range(args.repeats):
            order = list(HTTP_PORTS) if repeat % 2 == 0 else list(reversed(HTTP_PORTS))
            for mode in order:
                before = len(engine.history)
                load = asyncio.run(run_load(LoadConfig(f"http://{address}:{HTTP_PORTS[mode]}",
                                                       concurrency=args.concurrency, requests=args.requests,
                                                       texts=texts)))
                served = list(engine.history)[before:] if len(engine.history) < engine.history.maxlen else []
                row = {"mode": mode, "repeat": repeat, "workload": args.workload, **load.to_dict(),
                       "engine_calls": len(served),
                       "engine_calls_distributed": sum(r.mode == "distributed" for r in served),
                       "engine_rows_mean": statistics.mean(r.batch for r in served) if served else None,
                       "codecs": sorted({r.plan.get("codec") or "local" for r in served}),
                       "model": args.model, "link": args.link, "concurrency": args.concurrency,
                       "profile_hash": profile.profile_hash(), "torch": torch.__version__,
                       "host": {"cores": os.cpu_count(), "load_average": os.getloadavg()[0],
                                "machine": platform.machine()},
                       "setup": "2 devices: testbed network namespaces, kernel tbf link, one pinned core each; "
                                "coordinator = rank 0 in host 0, device = `edgeprism join` in host 1"}
                rows.append(row)
                print(f"[{mode}] repeat {repeat}: {load}", file=sys.stderr, flush=True)
        for stop in stops.values():
            stop.set()
        out = Path(args.out)
        with open(out / f"rows-{args.workload}.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        (out / f"tables-{args.workload}.md").write_text(table(rows, args))
        print(table(rows, args))
        return 0


def _passages(io, text_passages, count):
    """English passages of 128-250 tokens as the model's own tokenizer counts them."""
    class Counter:  # what text_passages asks of a tokenizer: encode(text) -> ids
        @staticmethod
        def encode(text):
            return [0] * io.count_tokens([text])[0]

    return text_passages(Counter(), 128, 250, limit=count)


def table(rows, args) -> str:
    def med(mode, key, sub=None):
        values = [r[key][sub] if sub else r[key] for r in rows if r["mode"] == mode]
        return statistics.median(values), min(values), max(values)

    what = "one passage of 128-250 tokens" if args.workload == "passages" else "one question of 5-20 words"
    lines = [f"# Dynamic batching, {args.model}, 2 devices over {args.link}, {args.concurrency} concurrent clients",
             "",
             f"{args.requests} requests per run ({what} each), {args.repeats} runs per mode, "
             "alternating which mode goes first; median (min-max). Testbed: network namespaces, kernel tbf link, one "
             "pinned core per device; the coordinator is rank 0.",
             "",
             "| mode | throughput req/s | p50 ms | p95 ms | rows per engine call | engine calls distributed | codecs |",
             "|---|---|---|---|---|---|---|"]
    for mode in HTTP_PORTS:
        t, p50, p95 = med(mode, "throughput_rps"), med(mode, "latency_ms", "p50"), med(mode, "latency_ms", "p95")
        mine = [r for r in rows if r["mode"] == mode]
        per_call = statistics.median(r["engine_rows_mean"] or 0 for r in mine)
        dist = sum(r["engine_calls_distributed"] for r in mine)
        calls = sum(r["engine_calls"] for r in mine)
        codecs = sorted({c for r in mine for c in r["codecs"]})
        lines.append(f"| {mode} | {t[0]:.2f} ({t[1]:.2f}-{t[2]:.2f}) | {p50[0]:.0f} ({p50[1]:.0f}-{p50[2]:.0f}) | "
                     f"{p95[0]:.0f} ({p95[1]:.0f}-{p95[2]:.0f}) | {per_call:.1f} | {dist} of {calls} | "
                     f"{', '.join(codecs)} |")
    ratios = []
    for repeat in range(args.repeats):
        pair = {r["mode"]: r for r in rows if r["repeat"] == repeat}
        if len(pair) == 2:
            ratios.append(pair["batching"]["throughput_rps"] / pair["no batching"]["throughput_rps"])
    if ratios:
        lines += ["", f"Throughput with / without batching, per repeat: "
                      f"{', '.join(f'{r:.2f}x' for r in ratios)} (median {statistics.median(ratios):.2f}x)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return inner(args) if args.inner else outer(args)
    except PermissionError as err:  # not root: no namespaces to run in
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
