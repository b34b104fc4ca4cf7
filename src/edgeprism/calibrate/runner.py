"""Evaluate, calibrate, evaluate again, save: what `edgeprism calibrate` and the experiment script run.

Evaluation always goes through the real distributed path (`evaluate.fidelity.evaluate`: `PositionWise`
over the loopback transport), never through the emulation that training uses.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from edgeprism.calibrate.checkpoint import save_checkpoint
from edgeprism.calibrate.tasks import CalibrationSetup, save_head, setup_for
from edgeprism.calibrate.train import CalibrationSettings, calibrate
from edgeprism.compress.registry import get_codec
from edgeprism.evaluate.fidelity import evaluate

log = logging.getLogger(__name__)


def eval_rows(setup: CalibrationSetup, model, head, codecs: list[str], world_size: int, variant: str,
              settings: CalibrationSettings | None = None) -> list[dict]:
    """One row per (codec, metric): `value` distributed, `local_value` the same weights on one device."""
    eval_set = setup.eval_set(model, head)
    rows = []
    for row in evaluate(eval_set, codecs, world_size, settings.shares if settings else None,
                        settings.size_aware if settings else True, average=settings.average if settings else "normed"):
        rows.append({"variant": variant, "model": row.model, "eval_set": row.eval_set, "codec": row.codec,
                     "world_size": row.world_size, "metric": row.metric, "value": row.value,
                     "local_value": row.reference_value, "traffic_vs_fp32": row.traffic_vs_fp32,
                     "num_requests": row.num_requests})
    return rows


def default_eval_codecs(codec: str) -> list[str]:
    names = ["fp32", str(get_codec(codec))]
    return list(dict.fromkeys(names))


def run_calibration(model_name: str, settings: CalibrationSettings, out: str | Path | None = None,
                    eval_codecs: list[str] | None = None, eval_limit: int | None = None,
                    checkpoint: str | Path | None = None, evaluate_before: bool = True,
                    progress: Callable[[str], None] | None = None) -> dict:
    """Calibrate `model_name` for `settings` and measure it before and after on held-out data.

    Writes to `out` (if given): config.json + model.safetensors (loadable with `--checkpoint`),
    classifier.safetensors (ViT), CALIBRATION.json (settings, losses, rows)."""
    say = progress or (lambda message: None)
    setup = setup_for(model_name, eval_limit=eval_limit, checkpoint=checkpoint, progress=progress)
    codecs = eval_codecs or default_eval_codecs(settings.codec)
    for name in codecs:
        get_codec(name)
    rows: list[dict] = []
    if evaluate_before:
        started = time.perf_counter()
        rows += eval_rows(setup, setup.model, setup.head, codecs, settings.world_size, "as-shipped", settings)
        say(f"before: {_summary(rows)} ({time.perf_counter() - started:.0f} s)")
    model, head, result = calibrate(setup.model, setup.task, settings, progress=say)
    after = eval_rows(setup, model, head, codecs, settings.world_size, "calibrated", settings)
    say(f"after:  {_summary(after)}")
    rows += after
    for row in rows:
        row.update({"calibrated_for": settings.codec, "calibration_world_size": settings.world_size,
                    "params": settings.params, "steps": settings.steps, "distill": settings.distill,
                    "batch_size": settings.batch_size, "learning_rate": settings.learning_rate,
                    "train_time_s": round(result.train_time_s, 1) if row["variant"] == "calibrated" else 0.0})
    summary = {"model": model_name, "source": setup.source, "calibration_data": getattr(setup.task, "name", ""),
               "result": result.to_dict(), "losses": [round(x, 5) for x in result.losses], "rows": rows,
               "torch_version": torch.__version__, "threads": torch.get_num_threads()}
    if out is not None:
        out = Path(out)
        save_checkpoint(model, out, {"edgeprism_calibration": {"codec": settings.codec,
                                                               "world_size": settings.world_size,
                                                               "params": settings.params, "steps": settings.steps}})
        if head is not None:
            save_head(head, out)
        (out / "CALIBRATION.json").write_text(json.dumps(summary, indent=1) + "\n")
        summary["out"] = str(out)
        say(f"wrote {out}")
    return summary


def _summary(rows: list[dict]) -> str:
    return ", ".join(f"{r['codec']} {r['metric']}={r['value']:.4g} (local {r['local_value']:.4g})"
                     for r in rows if r["metric"] in ("perplexity", "accuracy"))
