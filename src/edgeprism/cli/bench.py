"""`edgeprism bench`: run a benchmark scenario (TOML) and write raw rows, tables and plots.

Every strategy (one device, plain transformers, static full exchange, static Segment Means, pipeline,
tensor parallel, adaptive) runs on the same emulated devices and link, interleaved request by request.
`--from-rows` redraws tables and plots from an earlier run's rows.jsonl without running anything.
Metrics are defined in docs/METHODOLOGY.md.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from edgeprism.cli.budget import ALLOW_UNMEASURED_HELP


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="side-by-side benchmark of edgeprism and its peers from a scenario file",
                              description=__doc__)
    p.add_argument("--scenario", help="scenario TOML (see benchmarks/*.toml)")
    p.add_argument("--out", default="reports/bench", help="output folder (default reports/bench)")
    p.add_argument("--from-rows", help="only redraw tables/plots from this rows.jsonl")
    p.add_argument("--reprofile", action="store_true", help="ignore cached profiles (measured scenarios)")
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib figures")
    p.add_argument("--json", action="store_true", help="print ratios and goals as one JSON object")
    p.add_argument("--allow-unmeasured-codecs", action="store_true",
                   help=ALLOW_UNMEASURED_HELP + " (overrides the scenario's allow_unmeasured_codecs)")
    p.set_defaults(handler=handle)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def handle(args) -> int:
    from edgeprism.bench import tables
    from edgeprism.bench.runner import read_rows, run_scenario
    from edgeprism.bench.scenarios import load_scenario

    out_dir = Path(args.out)
    if args.from_rows:
        rows_path = Path(args.from_rows)
        if not rows_path.is_file():
            raise ValueError(f"--from-rows {rows_path} does not exist")
    elif args.scenario:
        scenario = load_scenario(args.scenario)
        if args.allow_unmeasured_codecs:
            scenario = replace(scenario, allow_unmeasured_codecs=True)
        if scenario.expected_minutes:
            _say(f"scenario {scenario.name}: {len(scenario.jobs())} jobs, about {scenario.expected_minutes:g} min here")
        rows_path = run_scenario(scenario, out_dir, say=_say, reprofile=args.reprofile)
    else:
        raise ValueError("give --scenario FILE (or --from-rows rows.jsonl to redraw tables)")
    rows = read_rows(rows_path)
    if not rows:
        raise ValueError(f"{rows_path} holds no rows")
    summary = tables.add_world_oracle(tables.add_oracle(tables.summarize(rows)))
    table = tables.ratios(summary, rows)
    checks = tables.goals(table)
    command = "edgeprism " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else \
        f"edgeprism bench --scenario {args.scenario} --out {args.out}"
    out_dir.mkdir(parents=True, exist_ok=True)
    facts = {**rows[0], "scenario": rows[0].get("scenario", "")}
    (out_dir / "tables.md").write_text(tables.markdown(summary, table, checks, command, facts))
    with open(out_dir / "summary.jsonl", "w") as handle_:
        for entry in summary:
            handle_.write(json.dumps(entry) + "\n")
    (out_dir / "ratios.json").write_text(json.dumps({"ratios": table, "goals": checks}, indent=1))
    plots = [] if args.no_plots else tables.write_plots(summary, out_dir)
    if args.json:
        print(json.dumps({"rows": str(rows_path), "ratios": table, "goals": checks}))
    else:
        for entry in table:
            if "adaptive_latency_s" not in entry:
                print(f"{entry['model_case']:<24} x{entry['world_size']} {entry['link']:<9} batch {entry['batch']:>2}  "
                      f"local / transformers {entry['local_over_transformers']:.3f}")
                continue
            print(f"{entry['model_case']:<24} x{entry['world_size']} {entry['link']:<9} batch {entry['batch']:>2}  "
                  f"adaptive {entry['adaptive_latency_s'] * 1e3:9.1f} ms  "
                  f"vs oracle {entry.get('adaptive_over_oracle', float('nan')):5.2f}x  "
                  f"vs best peer ({entry.get('best_peer', '-')}) "
                  f"{entry.get('adaptive_over_best_peer', float('nan')):5.2f}x"
                  f"  {entry['adaptive_plan']}")
        for check in checks:
            missed = f"MISSED at {len(check['misses'])} points"
            state = "met" if check["met"] else ("no data" if not check["points"] else missed)
            print(f"goal: {check['goal']}: {state}")
        print(f"\nrows: {rows_path}; tables: {out_dir / 'tables.md'}" + (f"; {len(plots)} plots" if plots else ""))
    return 0
