"""The HTTP side of the chaos run (edgeprism.bench.chaos), run as a file inside the coordinator's network
namespace (`ip netns exec NS python chaos_client.py ...`): standard library only, so it starts fast and
imports nothing of edgeprism. Writes files, never stdout.

    chaos_client.py get URL OUT.json         one GET, {"status", "body"} to OUT.json
    chaos_client.py load PLAN.json OUT.jsonl  the requests of PLAN from its `clients` threads

PLAN: {"url", "model", "texts": [...], "references": [[...], ...], "order": [text index per request],
"clients", "attempts", "timeout_s", "backoff_s"}. Each request POSTs one text to /v1/embeddings and is
retried (at most `attempts` sends, `backoff_s` apart) on no answer, a timeout or a 5xx status; a 4xx is
final. One JSON line per request: index, text, ok, status, attempts, latency_ms (first send to last
answer, retries included), mode, ranks, codec, fallback, cosine against the text's reference.
"""

import json
import logging
import math
import sys
import threading
import time
import urllib.error
import urllib.request

log = logging.getLogger("chaos_client")


def _send(url, body, timeout_s):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                     headers={} if data is None else {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"raw": raw.decode(errors="replace")}


def _cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm > 0 else 0.0


def one_request(plan, index):
    text = plan["order"][index]
    body = {"model": plan["model"], "input": [plan["texts"][text]]}
    row = {"index": index, "text": text, "ok": False, "status": None, "attempts": 0, "error": None}
    start = time.monotonic()
    for attempt in range(1, plan["attempts"] + 1):
        row["attempts"] = attempt
        try:
            status, answer = _send(plan["url"] + "/v1/embeddings", body, plan["timeout_s"])
        except (OSError, urllib.error.URLError) as err:  # no answer (refused, reset, timeout): retried
            row["status"], row["error"] = None, f"{type(err).__name__}: {err}"
        else:
            row["status"] = status
            if status == 200:
                meta = answer.get("edgeprism", {})
                got = answer["data"][0]["embedding"]
                row.update(ok=True, error=None, mode=meta.get("mode"), ranks=meta.get("ranks"),
                           codec=meta.get("codec"), fallback=bool(meta.get("fallback")),
                           cosine=_cosine(got, plan["references"][text]))
                break
            row["error"] = str(answer.get("error", answer))[:300]
            if status < 500:
                break
        time.sleep(plan["backoff_s"])
    row["latency_ms"] = round((time.monotonic() - start) * 1e3, 3)
    return row


def load(plan_path, out_path):
    with open(plan_path) as f:
        plan = json.load(f)
    total = len(plan["order"])
    lock = threading.Lock()
    state = {"next": 0, "done": 0}
    out = open(out_path, "w")

    def client():
        while True:
            with lock:
                index = state["next"]
                if index >= total:
                    return
                state["next"] += 1
            row = one_request(plan, index)
            with lock:
                out.write(json.dumps(row) + "\n")
                out.flush()
                state["done"] += 1
                if state["done"] % 100 == 0:
                    log.info("%d/%d answered", state["done"], total)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(plan["clients"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.close()


def main(argv):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s chaos-client %(message)s")
    if argv[0] == "get":
        status, body = _send(argv[1], None, 30.0)
        with open(argv[2], "w") as f:
            json.dump({"status": status, "body": body}, f)
    elif argv[0] == "load":
        load(argv[1], argv[2])
    else:
        raise SystemExit(f"unknown command {argv[0]!r}: get URL OUT | load PLAN OUT")


if __name__ == "__main__":
    main(sys.argv[1:])
