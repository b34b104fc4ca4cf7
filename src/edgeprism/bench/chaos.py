"""The chaos run: a deployed cluster on the kernel testbed under load while devices fail (issue 18, item 5).

`run_chaos(ChaosRunConfig(...), workdir)` (root; `scripts/chaos.py` is its command line):

1. computes the reference embedding of every text of a seeded pool on this process's model (one text per
   call, the folder's real weights): "one device";
2. brings up `hosts` quota-emulated devices (`Testbed(..., speeds=)`, network namespaces, kernel-shaped
   links), starts `edgeprism serve --listen --http` on host 0 and `edgeprism join` on the others, exactly
   as docs/DEPLOY.md does, with a synthetic lossless profile (fp32 only) that favours splitting;
3. sends `requests` requests (one text each, texts drawn with the seed) from `clients` concurrent HTTP
   clients inside host 0's namespace (`bench/chaos_client.py`), while `testbed.chaos.ChaosRunner` applies a
   seeded fault schedule (SIGKILL + restart, link cut, CPU quota lowered, link sag) to the devices;
4. checks every answer against its reference (cosine >= `min_cosine`) and summarises: requests, lost (no
   200 after the client's retries), mismatches, fallbacks (answers rerun on rank 0 after a failure, and
   /metrics' `edgeprism_fallbacks_total`), latency percentiles, RSS and open descriptors per process
   at the start and the end of the load, faults applied by kind.

Namespaces, CPU groups and processes go on every exit (try/finally; SIGTERM is turned into an exception).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgeprism import assets
from edgeprism.comm.auth import new_secret, write_secret_file
from edgeprism.inputs import load_io
from edgeprism.models.loading import load_model
from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile
from edgeprism.testbed.chaos import ChaosConfig, ChaosRunner, schedule
from edgeprism.testbed.net import Testbed
from edgeprism.testbed.presets import get_preset

log = logging.getLogger(__name__)
CLIENT = "edgeprism.bench.chaos_client"
"""The load client, run as `python -m` inside host 0's namespace."""
PORT, HTTP_PORT = 29400, 8000


@dataclass(frozen=True)
class ChaosRunConfig:
    """One chaos run. Times in seconds."""

    requests: int = 2000
    clients: int = 8
    hosts: int = 4
    """Testbed hosts: host 0 runs the coordinator (rank 0), the others one device each."""
    speeds: tuple[float, ...] = ()
    """CPU quota per host in cores; () gives every host 0.5."""
    link: str = "wifi4"
    model: str = "minilm-l6"
    texts: int = 48
    """Distinct texts in the pool (each with its reference)."""
    words: tuple[int, int] = (8, 48)
    """Words per text, drawn uniformly."""
    attempts: int = 3
    """The client's retry policy: at most this many sends per request (on no answer, timeout, 5xx)."""
    request_timeout_s: float = 60.0
    backoff_s: float = 1.0
    min_cosine: float = 1.0 - 1e-5
    min_stall_s: float = 2.0
    """The coordinator's `--min-stall`: what a request waits at most on a lost peer before its local rerun."""
    chaos: ChaosConfig = field(default_factory=ChaosConfig)

    def __post_init__(self) -> None:
        if not 2 <= self.hosts <= 8:
            raise ValueError(f"hosts={self.hosts}: the chaos run takes 2 to 8 hosts (the coordinator and devices)")
        if self.speeds and len(self.speeds) != self.hosts:
            raise ValueError(f"{len(self.speeds)} speeds {list(self.speeds)} for {self.hosts} hosts: give one per host")
        if self.requests < 1 or self.clients < 1 or self.attempts < 1 or self.texts < 1:
            raise ValueError(f"requests {self.requests}, clients {self.clients}, attempts {self.attempts} and texts "
                             f"{self.texts} must be >= 1")

    @property
    def host_speeds(self) -> tuple[float, ...]:
        return self.speeds or (0.5,) * self.hosts


def text_pool(count: int, words: tuple[int, int], seed: int) -> list[str]:
    """`count` passages of Hamlet (the package's own text), lengths drawn with `seed`."""
    text = gzip.decompress((Path(assets.__file__).parent / "text" / "hamlet.txt.gz").read_bytes()).decode()
    tokens = text.split()
    rng = random.Random(seed)
    pool = []
    for _ in range(count):
        n = rng.randint(*words)
        start = rng.randrange(0, len(tokens) - n)
        pool.append(" ".join(tokens[start:start + n]))
    return pool


def references(model_name: str, folder: Path, texts: list[str]) -> list[list[float]]:
    """Each text's embedding on one device (this process), one text per call: nothing padded."""
    model = load_model(model_name, folder)
    io = load_io(model.config, folder)
    out = []
    with torch.no_grad():
        for text in texts:
            inputs = io.encode_texts([text])
            out.append(io.embeddings(model(inputs), inputs)[0].tolist())
    return out


def _proc_stat(pid: int) -> dict[str, float]:
    """RSS (MiB) and open descriptors of a live process; {} when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return {}
    rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return {"rss_mb": round(rss_kib / 1024, 1), "fds": fds}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class Deployment:
    """The coordinator on host 0 and one `join` per device host, as docs/DEPLOY.md starts them; logs in `workdir`."""

    def __init__(self, testbed: Testbed, workdir: Path, config: ChaosRunConfig, folder: Path, profile: Path):
        self.tb, self.workdir, self.config, self.folder = testbed, workdir, config, folder
        self.secret = write_secret_file(workdir / "cluster.secret", new_secret())
        self.h0 = testbed.hosts[0]
        self.listen = f"{self.h0.address}:{PORT}"
        self.url = f"http://{self.h0.address}:{HTTP_PORT}"
        self.env = {**os.environ, "EDGEPRISM_LINK_FILE": testbed.link_file}
        self.devices: dict[int, subprocess.Popen] = {}
        self.restarts: Counter[int] = Counter()
        self.coordinator = self._start(0, "coordinator", [
            "serve", "--model", config.model, "--checkpoint", str(folder), "--profile", str(profile),
            "--listen", self.listen, "--world-size", str(config.hosts), "--secret-file", str(self.secret),
            "--http", "--host", self.h0.address, "--port", str(HTTP_PORT), "--fixed-link",
            "--min-stall", str(config.min_stall_s), "--outputs", "none"])
        self._await_log(self.coordinator, workdir / "coordinator.log", "listening on http://")

    def _start(self, host: int, name: str, argv: list[str]) -> subprocess.Popen:
        cmd = [*self.tb.command_prefix(self.tb.hosts[host]), sys.executable, "-m", "edgeprism", *argv]
        with open(self.workdir / f"{name}.log", "a") as logfile:
            return subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=logfile,
                                    start_new_session=True)

    @staticmethod
    def _await_log(proc: subprocess.Popen, path: Path, text: str, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in path.read_text(errors="replace"):
                return
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        tail = path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{path.name}: no {text!r} within {timeout_s:.0f} s (exit {proc.poll()}):\n{tail}")

    def join(self, host: int) -> None:
        self.devices[host] = self._start(host, f"device{host}", [
            "join", self.listen, "--secret-file", str(self.secret), "--checkpoint", str(self.folder)])

    def kill(self, host: int) -> None:
        proc = self.devices.get(host)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart(self, host: int) -> None:
        self.restarts[host] += 1
        self.join(host)

    def client(self, *argv: str, timeout_s: float | None = None) -> None:
        cmd = ["ip", "netns", "exec", str(self.h0.netns), sys.executable, "-m", CLIENT, *argv]
        with open(self.workdir / "client.log", "a") as logfile:
            subprocess.run(cmd, check=True, stdout=logfile, stderr=logfile, timeout=timeout_s)

    def get(self, path: str) -> dict[str, Any]:
        out = self.workdir / "get.json"
        self.client("get", self.url + path, str(out), timeout_s=60)
        return json.loads(out.read_text())

    def wait_members(self, count: int, timeout_s: float = 300.0) -> list[int]:
        deadline = time.monotonic() + timeout_s
        members: list[int] = []
        while time.monotonic() < deadline:
            members = self.get("/v1/cluster")["body"].get("members", [])
            if len(members) >= count:
                return members
            time.sleep(1.0)
        raise RuntimeError(f"members {members} never reached {count} in {timeout_s:.0f} s")

    def stats(self) -> dict[str, dict[str, Any]]:
        out = {"host0 (coordinator)": {"pid": self.coordinator.pid, **_proc_stat(self.coordinator.pid)}}
        for host, proc in sorted(self.devices.items()):
            out[f"host{host}"] = {"pid": proc.pid, **_proc_stat(proc.pid)}
        return out

    def close(self) -> None:
        procs = [*self.devices.values(), self.coordinator]
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _fallbacks_metric(deploy: Deployment) -> float | None:
    """/metrics' `edgeprism_fallbacks_total` (None when the counter was never written)."""
    text = deploy.get("/metrics")["body"].get("raw", "")
    for line in text.splitlines():
        if line.startswith("edgeprism_fallbacks_total"):
            return float(line.split()[-1])
    return 0.0 if "edgeprism_" in text else None


def summarize(rows: list[dict[str, Any]], config: ChaosRunConfig) -> dict[str, Any]:
    """The numbers of one load: what was lost, what differed from one device, how long it took."""
    answered = [r for r in rows if r["ok"]]
    latencies = [r["latency_ms"] for r in answered]
    mismatches = [r for r in answered if r["cosine"] < config.min_cosine]
    return {
        "requests": config.requests, "recorded": len(rows), "answered": len(answered),
        "lost": config.requests - len(answered), "lost_statuses": dict(Counter(str(r["status"]) for r in rows
                                                                            if not r["ok"])),
        "mismatches": len(mismatches), "min_cosine": min((r["cosine"] for r in answered), default=None),
        "fallbacks": sum(bool(r.get("fallback")) for r in answered),
        "retried": sum(r["attempts"] > 1 for r in rows),
        "modes": dict(Counter(f"{r.get('mode')} x{len(r.get('ranks') or [0])}" for r in answered)),
        "latency_ms": {q: round(percentile(latencies, float(q[1:])), 1) if latencies else None
                       for q in ("p50", "p95", "p99", "p100")},
    }


def run_chaos(config: ChaosRunConfig, workdir: Path) -> dict[str, Any]:
    """One chaos run (root, `ip`, `tc`, the model folder from `make assets`); its summary (also in
    workdir/summary.json, the per-request rows in workdir/requests.jsonl)."""
    if os.geteuid() != 0:
        raise PermissionError("the chaos run needs root (network namespaces, CPU groups); run it with sudo")
    folder = assets.cache_dir() / {"minilm-l6": assets.MINILM_DIRNAME}.get(config.model, config.model)
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"{folder} is missing: run `make assets`")
    workdir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    texts = text_pool(config.texts, config.words, config.chaos.seed)
    refs = references(config.model, folder, texts)
    rng = random.Random(config.chaos.seed + 1)
    order = [rng.randrange(len(texts)) for _ in range(config.requests)]
    hidden = load_model(config.model, folder).config.hidden_size
    profile = synthetic_profile(config.model, world_size=config.hosts, bandwidth_bps=1e9, latency_s=1e-4,
                                codecs=synthetic_codecs(hidden)[:1])  # fp32 only: lossless, so exact
    profile_path = workdir / "profile.json"
    profile.save(profile_path)
    plan = {"url": "", "model": config.model, "texts": texts, "references": refs, "order": order,
            "clients": config.clients, "attempts": config.attempts, "timeout_s": config.request_timeout_s,
            "backoff_s": config.backoff_s}

    def terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminate)
    testbed = Testbed(config.hosts, get_preset(config.link), backend="netns", speeds=config.host_speeds)
    deploy = runner = None
    try:
        testbed.up()
        deploy = Deployment(testbed, workdir, config, folder, profile_path)
        plan["url"] = deploy.url
        for host in range(1, config.hosts):
            deploy.join(host)
        deploy.wait_members(config.hosts)
        warm = {**plan, "order": order[:16]}
        (workdir / "warmup.json").write_text(json.dumps(warm))
        deploy.client("load", str(workdir / "warmup.json"), str(workdir / "warmup.jsonl"), timeout_s=600)
        start_stats = deploy.stats()
        events = schedule(config.chaos, list(range(1, config.hosts)), horizon_s=24 * 3600.0)
        runner = ChaosRunner(testbed, events, config.chaos, kill=deploy.kill, restart=deploy.restart)
        (workdir / "plan.json").write_text(json.dumps(plan))
        started = time.monotonic()
        runner.start()
        deploy.client("load", str(workdir / "plan.json"), str(workdir / "requests.jsonl"))
        wall_s = time.monotonic() - started
        runner.stop()
        end_stats = deploy.stats()
        rows = [json.loads(line) for line in (workdir / "requests.jsonl").read_text().splitlines()]
        summary = {**summarize(rows, config), "wall_s": round(wall_s, 1),
                   "fallbacks_metric": _fallbacks_metric(deploy),
                   "events": dict(runner.applied), "event_errors": runner.errors,
                   "restarts": dict(deploy.restarts),
                   "processes": {name: {"start": start_stats.get(name), "end": stats}
                                 for name, stats in end_stats.items()},
                   "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
                   "config": asdict(config)}
        (workdir / "chaos_events.log").write_text("\n".join(runner.log) + "\n")
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
    finally:
        if runner is not None:
            runner.stop()
        if deploy is not None:
            deploy.close()
        testbed.down()
        signal.signal(signal.SIGTERM, previous)


__all__ = ["ChaosRunConfig", "Deployment", "percentile", "references", "run_chaos", "summarize", "text_pool"]
