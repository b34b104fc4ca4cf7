"""Plots and a markdown summary drawn from demo/benchmark rows only (never from live objects)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COLORS = {"local": "#555555", "full_exchange": "#d62728", "segment_means": "#1f77b4", "adaptive": "#2ca02c",
          "oracle": "#9467bd"}


def pyplot(what: str) -> Any | None:
    """matplotlib.pyplot on the file-only Agg backend, or None with one warning that `what` is not drawn
    (matplotlib is optional: the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'edgeprism[plot]'): %s not drawn", what)
        return None
    return plt


def save_figure(plt: Any, fig: Any, path: Path) -> Path:
    """Lay `fig` out, write it to `path` at 110 dpi and close it; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_markdown(path: Path, report: dict) -> None:
    lines = [
        f"# edgeprism demo: {report['model']}",
        "",
        f"- devices: {report['world_size']} ({report['note']})",
        f"- link phases: {', '.join(report['links'])}; emulation: {report['emulation']}",
        f"- static Segment Means codec: {report['segment_means_codec']}; objective: {report['objective']}; "
        f"fidelity budget: {report['max_fidelity_loss']}",
        f"- fidelity: {report.get('fidelity', 'not recorded')}",
        f"- host: {report.get('host_load', 'not recorded')}",
        f"- served: {report.get('data', 'synthetic')} inputs, weights: {report.get('checkpoint', 'random weights')}"
        + ("; probe accuracy over every image: "
           + ", ".join(f"{k} {v:.1%}" for k, v in report["probe_accuracy"].items())
           if report.get("probe_accuracy") else ""),
        f"- profile: `{report['profile']}`; run took {report['demo_seconds']:.0f} s",
        "",
        "| link | batch | strategy | latency ms, median [p25–p75] | energy J | energy source | fidelity loss "
        "| probe accuracy | plan |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        loss = r.get("fidelity_loss", 0.0)
        loss_text = "unmeasured" if loss is None else f"{loss:.2%}"
        accuracy = "—" if r.get("probe_accuracy") is None else f"{r['probe_accuracy']:.1%}"
        spread = ("" if r.get("latency_p25_s") is None
                  else f" [{r['latency_p25_s'] * 1e3:.0f}–{r['latency_p75_s'] * 1e3:.0f}] (n={r['n']})")
        lines.append(f"| {r['link']} | {r['batch']} | {r['strategy']} | {r['latency_s'] * 1e3:.1f}{spread} | "
                     f"{r['energy_j']:.2f} | {r['energy_source']} | {loss_text} | "
                     f"{accuracy} | {r['plan']} |")
    lines += ["", "| link | batch | adaptive latency vs full exchange | energy vs full exchange | adaptive / oracle "
                  "| adaptive / local | adaptive plan |", "|---|---|---|---|---|---|---|"]
    for g in report["ratios"]:
        vs_full = "—" if g["latency_reduction_vs_full"] is None else f"{-g['latency_reduction_vs_full']:+.1%}"
        energy = "—" if g["energy_reduction_vs_full"] is None else f"{-g['energy_reduction_vs_full']:+.1%}"
        lines.append(f"| {g['link']} | {g['batch']} | {vs_full} | {energy} | {g['adaptive_over_oracle']:.2f}x | "
                     f"{g['adaptive_over_local']:.2f}x | {g['adaptive_plan']} |")
    path.write_text("\n".join(lines) + "\n")


def write_plots(out_dir: Path, rows: list[dict], table: list[dict]) -> list[Path]:
    """PNG plots; returns the files written (none, with one warning, if matplotlib is missing)."""
    plt = pyplot("the demo's plots")
    if plt is None:
        return []
    written = []
    for phase in sorted({r["phase"] for r in table}):
        link = next(r["link"] for r in table if r["phase"] == phase)
        for metric, unit, scale in (("latency_s", "latency (ms)", 1e3), ("energy_j", "modelled energy (J)", 1.0)):
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            for strategy, color in COLORS.items():
                points = sorted((r["batch"], r[metric] * scale) for r in table
                                if r["phase"] == phase and r["strategy"] == strategy)
                if points:
                    ax.plot(*zip(*points), marker="o", label=strategy.replace("_", " "), color=color,
                            linestyle="--" if strategy == "oracle" else "-")
            crossover = _crossover(table, phase)
            if crossover is not None and metric == "latency_s":
                ax.axvline(crossover, color="#999999", linestyle=":", label=f"distributed wins from batch {crossover}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size (images)")
            ax.set_ylabel(unit)
            ax.set_title(f"{metric.split('_')[0]} vs batch, link {link}")
            ax.legend(fontsize=8)
            written.append(save_figure(plt, fig, out_dir / f"{metric.split('_')[0]}_vs_batch_{link}.png"))
    measured = [r for r in rows if r["strategy"] != "oracle"]
    if measured:
        fig, ax = plt.subplots(figsize=(5.2, 5.0))
        for strategy, color in COLORS.items():
            pts = [
                (r["predicted_latency_s"] * 1e3, r["latency_s"] * 1e3) for r in measured if r["strategy"] == strategy
            ]
            if pts:
                ax.scatter(*zip(*pts), s=18, color=color, label=strategy.replace("_", " "))
        low = min(min(r["predicted_latency_s"], r["latency_s"]) for r in measured) * 1e3
        high = max(max(r["predicted_latency_s"], r["latency_s"]) for r in measured) * 1e3
        ax.plot([low, high], [low, high], color="#999999", linestyle=":", label="measured = predicted")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("predicted latency (ms)")
        ax.set_ylabel("measured latency (ms)")
        ax.legend(fontsize=8)
        written.append(save_figure(plt, fig, out_dir / "predicted_vs_measured.png"))
        adaptive = [r for r in measured if r["strategy"] == "adaptive"]
        if adaptive:
            fig, ax = plt.subplots(figsize=(7.5, 3.8))
            plans = sorted({r["plan"] for r in adaptive})
            for i, plan in enumerate(plans):
                pts = [(j, r["latency_s"] * 1e3) for j, r in enumerate(adaptive) if r["plan"] == plan]
                ax.scatter(*zip(*pts), label=plan, s=30, marker="os^vD<>"[i % 7])
            for j in range(1, len(adaptive)):
                if adaptive[j]["phase"] != adaptive[j - 1]["phase"]:
                    ax.axvline(j - 0.5, color="#999999", linestyle=":", label=f"link -> {adaptive[j]['link']}")
            ax.set_yscale("log")
            ax.set_xlabel("adaptive request (in arrival order; batch grows within each phase)")
            ax.set_ylabel("latency (ms)")
            ax.set_title("adaptive plan timeline across the link change")
            ax.legend(fontsize=8)
            written.append(save_figure(plt, fig, out_dir / "plan_timeline.png"))
    return written


def _crossover(table: list[dict], phase: int) -> int | None:
    """Smallest batch from which the best distributed static strategy beats local."""
    for batch in sorted({r["batch"] for r in table if r["phase"] == phase}):
        get = {r["strategy"]: r["latency_s"] for r in table if (r["phase"], r["batch"]) == (phase, batch)}
        distributed = [get[s] for s in ("full_exchange", "segment_means") if s in get]
        if "local" in get and distributed and min(distributed) < get["local"]:
            return batch
    return None


def write_frontier_plot(path: Path, rows: list[dict]) -> Path | None:
    """Fidelity vs traffic per codec (one panel per evaluation set and metric), from `edgeprism eval` rows."""
    plt = pyplot("the frontier plot")
    if plt is None:
        return None
    panels = sorted({(r["eval_set"], r["metric"]) for r in rows})
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (eval_set, metric) in zip(axes[0], panels):
        mine = [r for r in rows if (r["eval_set"], r["metric"]) == (eval_set, metric)]
        for variant in sorted({(r.get("size_aware", False), r.get("average", "residual")) for r in mine}):
            pts = sorted((r["traffic_vs_fp32"], r["value"], r["codec"]) for r in mine
                         if (r.get("size_aware", False), r.get("average", "residual")) == variant)
            label = f"size-aware={'on' if variant[0] else 'off'}, {variant[1]}"
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=22, label=label)
            for x, y, codec in pts:
                ax.annotate(codec, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        reference = mine[0]["reference_value"]
        ax.axhline(reference, color="#999999", linestyle=":", label="single device")
        ax.set_xscale("log")
        ax.set_xlabel("traffic vs full fp32 exchange")
        ax.set_ylabel(metric)
        ax.set_title(eval_set, fontsize=10)
        ax.legend(fontsize=6)
    return save_figure(plt, fig, path)
