"""The HTTP side of the chaos run (edgeprism.bench.chaos), run inside the coordinator's network namespace
(`ip netns exec NS python -m edgeprism.bench.chaos_client ...`). Its one HTTP client is
`edgeprism.api.client.FailoverClient` (standard library only, like this module, so it starts fast and
imports no model code). Writes files, never stdout.

    python -m edgeprism.bench.chaos_client get URL OUT.json         one GET, {"status", "body"} to OUT.json
    python -m edgeprism.bench.chaos_client load PLAN.json OUT.jsonl  the requests of PLAN from `clients` threads

PLAN: {"url", "model", "texts": [...], "references": [[...], ...], "order": [text index per request],
"clients", "attempts", "timeout_s", "backoff_s"}. Each request POSTs one text to /v1/embeddings and is
retried (at most `attempts` sends, `backoff_s` apart) on no answer, a timeout or a 5xx status; a 4xx is
final. One JSON line per request: index, text, ok, status, attempts, latency_ms (first send to last
answer, retries included), mode, ranks, codec, fallback, cosine against the text's reference.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from edgeprism.api.client import FailoverClient

log = logging.getLogger(__name__)


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm > 0 else 0.0


def plan_client(plan: dict[str, Any]) -> FailoverClient:
    """The client of one load thread: PLAN's URL, sends bounded by `attempts` alone, 5xx answers retried."""
    return FailoverClient([plan["url"]], timeout_s=plan["timeout_s"], retry_for_s=math.inf,
                          pause_s=plan["backoff_s"], retry_server_errors=True, max_attempts=plan["attempts"])


def one_request(plan: dict[str, Any], index: int, client: FailoverClient) -> dict[str, Any]:
    """The row of request `index` of PLAN (see the module docstring)."""
    text = plan["order"][index]
    body = {"model": plan["model"], "input": [plan["texts"][text]]}
    row: dict[str, Any] = {"index": index, "text": text, "ok": False, "status": None, "attempts": 0, "error": None}
    start = time.monotonic()
    try:
        reply = client.post("/v1/embeddings", body)
    except ConnectionError as err:  # no answer to the last send (refused, reset, timeout)
        row.update(attempts=plan["attempts"], error=f"{type(err).__name__}: {err}")
    else:
        row.update(status=reply.status, attempts=reply.attempts)
        answer = reply.body
        if reply.status == 200:
            meta = answer.get("edgeprism", {})
            got = answer["data"][0]["embedding"]
            row.update(ok=True, mode=meta.get("mode"), ranks=meta.get("ranks"), codec=meta.get("codec"),
                       fallback=bool(meta.get("fallback")), cosine=_cosine(got, plan["references"][text]))
        else:
            row["error"] = str(answer.get("error", answer) if isinstance(answer, dict) else answer)[:300]
    row["latency_ms"] = round((time.monotonic() - start) * 1e3, 3)
    return row


def load(plan_path: str, out_path: str) -> None:
    with open(plan_path) as f:
        plan = json.load(f)
    total = len(plan["order"])
    lock = threading.Lock()
    state = {"next": 0, "done": 0}
    out = open(out_path, "w")

    def client_thread() -> None:
        client = plan_client(plan)
        while True:
            with lock:
                index = state["next"]
                if index >= total:
                    return
                state["next"] += 1
            row = one_request(plan, index, client)
            with lock:
                out.write(json.dumps(row) + "\n")
                out.flush()
                state["done"] += 1
                if state["done"] % 100 == 0:
                    log.info("%d/%d answered", state["done"], total)

    threads = [threading.Thread(target=client_thread, daemon=True) for _ in range(plan["clients"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.close()


def get(url: str, out_path: str) -> None:
    """One GET of a full URL, no retry; a body that is not JSON is written as {"raw": text}."""
    parts = urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}"
    reply = FailoverClient([base], timeout_s=30.0, max_attempts=1).get(url[len(base):] or "/")
    body = reply.body if isinstance(reply.body, (dict, list)) else {"raw": reply.body}
    with open(out_path, "w") as f:
        json.dump({"status": reply.status, "body": body}, f)


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s chaos-client %(message)s")
    if argv[0] == "get":
        get(argv[1], argv[2])
    elif argv[0] == "load":
        load(argv[1], argv[2])
    else:
        raise SystemExit(f"unknown command {argv[0]!r}: get URL OUT | load PLAN OUT")


if __name__ == "__main__":
    main(sys.argv[1:])
