"""Run a scenario: per job, bring up the testbed, get its profile, run the job, collect raw rows.

    rows_path = run_scenario(load_scenario("benchmarks/smoke.toml"), "reports/bench/smoke")

Rows (one JSON object per timed request, plus one per skipped strategy and point) are appended to
`<out>/rows.jsonl`; every row carries the facts of its job (emulation, profile hash, git SHA, versions,
host facts) so that tables and plots need nothing else. Metrics: docs/METHODOLOGY.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from edgeprism.bench.ranks import bench_rank
from edgeprism.bench.scenarios import Job, JobSpec, Scenario

log = logging.getLogger(__name__)

JOB_TIMEOUT_S = 12 * 3600.0


def git_sha() -> str:
    """The commit the installed package comes from ("" outside a git checkout), "+dirty" if modified."""
    root = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{sha}+dirty" if sha and dirty else sha


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return ""


def host_facts() -> dict:
    """What the rows say about the machine (no host names): CPU model, cores, load, versions."""
    cpu_model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as handle:
            cpu_model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                             cpu_model)
    except OSError:
        pass
    return {"cpu_model": cpu_model, "num_cores": os.cpu_count(), "machine": platform.machine(),
            "cores_per_device": 1, "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
            "python_version": platform.python_version(), "torch_version": _version("torch"),
            "transformers_version": _version("transformers"), "edgeprism_version": _version("edgeprism"),
            "git_sha": git_sha()}


def _profile_path(scenario: Scenario, job: Job, session, out_dir: Path, reprofile: bool,
                  say: Callable[[str], None]) -> tuple[str, str]:
    """(profile file, how it was obtained) for the job: synthetic, cached or freshly measured."""
    from edgeprism.testbed.presets import get_preset

    link = get_preset(job.link)
    if scenario.profile == "synthetic":
        from edgeprism.models.loading import model_config
        from edgeprism.plan.synthetic import synthetic_profile

        path = out_dir / "profiles" / f"synthetic-{job.model.label}-w{job.world_size}-{job.link}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        synthetic_profile(model_config(job.model.name), world_size=job.world_size,
                          device_speeds=job.speeds or None, bandwidth_bps=link.rate_bps,
                          latency_s=link.delay_s).save(path)
        return str(path), "synthetic (not measured: planner numbers only)"
    from edgeprism.assets import cache_dir
    from edgeprism.profile.profiler import ProfileOptions, run_profile

    emulation = session.testbed.emulation if session.testbed is not None else "none"
    key_parts = [job.batches, job.model.seq_len] + ([os.path.abspath(job.model.name)] if
                                                    os.path.isdir(job.model.name) else [])
    key_parts += [list(job.speeds)] if job.speeds else []
    key_parts += [list(job.codecs)] if job.codecs else []  # old keys stay
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:8]
    path = cache_dir() / "profiles" / f"bench-{job.model.label}-w{job.world_size}-{job.link}-{emulation}-{key}.json"
    if path.exists() and not reprofile:
        say(f"profile: cached {path}")
        return str(path), "measured (cached)"
    say(f"profile: measuring {job.model.label} on {job.world_size} devices over {link} ...")
    options = ProfileOptions(model=job.model.name, world_size=job.world_size, link=link,
                             link_backend=scenario.backend, batches=tuple(sorted(set(job.batches))),
                             seq_lens=(job.model.seq_len,) if job.model.seq_len else None, evaluate=False,
                             seed=job.seed, codecs=tuple(job.codecs))
    report = run_profile(options, session, progress=lambda done, total, what: say(f"  [{done}/{total}] {what}"),
                         message=lambda text: say(f"  {text}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    report.profile.save(path)
    say(f"profile: {report.profile_seconds:.0f} s, saved to {path}")
    return str(path), "measured"


def run_scenario(scenario: Scenario, out_dir: str | Path, say: Callable[[str], None] = lambda text: None,
                 reprofile: bool = False, job_timeout_s: float = JOB_TIMEOUT_S) -> Path:
    """Run every job of `scenario`; return the path of rows.jsonl (replaced, not appended to)."""
    from edgeprism.profile.link import LinkSession
    from edgeprism.profile.schema import Profile
    from edgeprism.testbed.presets import get_preset

    out_dir = Path(out_dir)
    (out_dir / "jobs").mkdir(parents=True, exist_ok=True)
    rows_path = out_dir / "rows.jsonl"
    rows_path.write_text("")
    facts = host_facts()
    (out_dir / "scenario.json").write_text(json.dumps({"scenario": scenario.to_dict(), "facts": facts}, indent=1))
    jobs = scenario.jobs()
    for index, job in enumerate(jobs):
        link = get_preset(job.link)
        started = time.perf_counter()
        say(f"job {index + 1}/{len(jobs)}: {job.label}")
        with LinkSession(job.world_size, link, backend=scenario.backend, timeout_s=job_timeout_s,
                         speeds=job.speeds or None) as session:
            emulation = session.testbed.emulation
            profile, profile_source = _profile_path(scenario, job, session, out_dir, reprofile, say)
            job_rows = out_dir / "jobs" / f"{index:03d}.jsonl"
            job_rows.write_text("")
            spec = JobSpec(job=job, profile=os.path.abspath(profile),
                           facts={**facts, "emulation": f"{emulation}: {link}", "link_rate_bps": link.rate_bps,
                                  "link_delay_s": link.delay_s, "profile_hash": Profile.load(profile).profile_hash(),
                                  "profile_source": profile_source},
                           link_rate_bps=link.rate_bps)

            def progress(line: str, job=job, job_rows=job_rows) -> None:
                with open(job_rows, "a") as rows:
                    rows.write(line + "\n")
                row = json.loads(line)
                latency = ("skipped" if row.get("skipped") else f"{row['latency_s'] * 1e3:9.1f} ms")
                say(f"  {job.link:<9} x{job.world_size} batch {row['batch']:>2} {row['strategy']:<22} {latency}  "
                    f"{row.get('plan', '')}")

            try:
                session.run(bench_rank, spec.to_dict(), on_progress=progress, dist_backend="gloo")
            finally:  # a failed job's finished rows still count (`--from-rows` draws them)
                with open(rows_path, "a") as out:
                    out.write(job_rows.read_text())
        say(f"job {index + 1}/{len(jobs)} done in {time.perf_counter() - started:.0f} s")
    return rows_path


def read_rows(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


__all__ = ["git_sha", "host_facts", "read_rows", "run_scenario"]
