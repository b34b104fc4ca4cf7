"""Soak: many requests of mixed sizes through `edgeprism serve` (3 ranks); every one answered, and the
resident memory of every rank flat after warm-up. Slow; not run by default:

    pytest -m slow tests/test_soak.py -s          # EDGEPRISM_SOAK_REQUESTS=10000 (default)

It prints, and writes to soak-rss.json in pytest's tmp dir, each rank's RSS at the end of warm-up and
its largest value after it.
"""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeprism.models.config import get_config
from edgeprism.plan.synthetic import synthetic_codecs, synthetic_profile

BERT = get_config("bert-tiny-test")
WARMUP_FRACTION = 0.1
RSS_TOLERANCE = 0.05


def _rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _ranks(serve_pid: int) -> dict[str, int]:
    """rank name → pid: the serve process is rank 0; its worker children (any depth) are the others."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    pids, todo = {}, [serve_pid]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"join" in cmdline and b"--rank" in cmdline:  # a local worker: `edgeprism join ADDR --rank R`
                rank = cmdline[cmdline.index(b"--rank") + 1].decode()
                pids[f"rank {rank}"] = child
            todo.append(child)
    return {"rank 0": serve_pid, **dict(sorted(pids.items()))}


def _requests(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.02:
            lines.append('{"id": "bad%d", "model_input": ' % i)  # malformed: answered with an error
        elif kind < 0.5:
            lines.append(json.dumps({"id": f"r{i}", "synthetic": {"batch": rng.randint(1, 4),
                                                                  "seq_len": rng.randint(4, 128), "seed": i}}))
        else:
            seq = rng.randint(2, 120)
            ids = [[rng.randint(1, BERT.vocab_size - 1) for _ in range(seq)] for _ in range(rng.randint(1, 3))]
            lines.append(json.dumps({"id": f"r{i}", "model_input": {"input_ids": ids}}))
    return lines


@pytest.mark.slow
def test_soak_every_request_answered_and_rss_flat(tmp_path):
    n = int(os.environ.get("EDGEPRISM_SOAK_REQUESTS", "10000"))
    profile = tmp_path / "profile.json"
    synthetic_profile("bert-tiny-test", world_size=3, bandwidth_bps=1e9, latency_s=1e-3, seconds_per_image=300,
                      codecs=synthetic_codecs(BERT.hidden_size)[:1]).save(profile)
    lines = _requests(n)
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "edgeprism.cli.main", "serve", "--model", "bert-tiny-test",
                             "--profile", str(profile), "--world-size", "3", "--max-batch", "4", "--outputs", "none",
                             "--input", str(requests)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    answers, samples, ranks = [], [], None
    warmup = int(n * WARMUP_FRACTION)
    start = time.monotonic()
    for line in proc.stdout:
        answers.append(json.loads(line))
        if len(answers) % 100 == 0:
            ranks = ranks if ranks and len(ranks) == 3 else _ranks(proc.pid)
            samples.append((len(answers), {name: _rss_bytes(pid) for name, pid in ranks.items()}))
    assert proc.wait(timeout=120) == 0
    elapsed_s = time.monotonic() - start

    assert [a["id"] for a in answers] == [json.loads(x)["id"] if not x.startswith('{"id": "bad') else
                                          f"line{i + 1}" for i, x in enumerate(lines)]
    errors = [a for a in answers if "error" in a]
    assert all(a["id"].startswith("line") for a in errors), errors[:3]
    served = [a for a in answers if "error" not in a]
    assert not any(a["metrics"]["fallback"] for a in served)
    modes = {m: sum(a["metrics"]["mode"] == m for a in served) for m in ("local", "distributed")}
    assert modes["distributed"] > 0, modes

    after = [rss for count, rss in samples if count >= warmup]
    assert len(after) >= 2 and len(ranks) == 3, (samples[:2], ranks)
    report = {"requests": n, "served": len(served), "refused": len(errors), "modes": modes,
              "elapsed_s": round(elapsed_s, 1), "warmup_requests": warmup, "rss": {}}
    for name in ranks:
        base = after[0][name]
        peak = max(s[name] for s in after)
        report["rss"][name] = {"after_warmup_mib": round(base / 2**20, 1), "max_after_mib": round(peak / 2**20, 1),
                               "growth": round(peak / base - 1, 4)}
    (tmp_path / "soak-rss.json").write_text(json.dumps(report, indent=2))
    print("\nsoak:", json.dumps(report, indent=2))
    for name, row in report["rss"].items():
        assert row["growth"] <= RSS_TOLERANCE, (name, row)
