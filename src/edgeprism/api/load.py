"""A load generator for the API: concurrent clients, bounded in requests and time, one report.

    python -m edgeprism.api.load --url http://127.0.0.1:8000 --endpoint embeddings --concurrency 8 \\
        --requests 200 --synthetic-tokens 128-256 --json

`--concurrency` clients (asyncio + httpx, one connection pool) send at most `--requests` requests, and
none after `--duration` seconds, only to `--url`. A cluster with a succession of coordinators
(docs/DEPLOY.md) is given as several comma-separated URLs in the succession order: a request whose
connection fails goes to the next one (round and round, for at most `--failover` seconds: the rule of
`edgeprism.api.client.Succession`, which the blocking `FailoverClient` follows too), its latency counted from
its first send; the report counts these moves (`failovers`). Texts come from `--texts FILE`
(one per line, used in turn) or are synthetic: `--synthetic-tokens LOW-HIGH` words of a small vocabulary per text (about
one token each), drawn with a fixed seed. A server started with `--api-key-file` is given the key with
`--api-key-file FILE` (sent as `Authorization: Bearer <key>`); an https server with a self-signed
certificate, that certificate with `--ca-file`. The report: throughput (requests/s and rows/s), latency
percentiles in ms (p50 / p95 / p99), errors by status, and what the server said about batching (the
mean `batched_with` of the answers). Run it against a server with and without dynamic batching to get
the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from edgeprism.api.client import Succession

ENDPOINTS = {"embeddings": "/v1/embeddings", "completions": "/v1/completions", "infer": "/infer"}
_WORDS = ("the quick brown fox jumps over lazy dog a model splits tokens across edge devices and each rank "
          "owns positions while codecs compress what crosses the link between them").split()


@dataclass(frozen=True)
class LoadConfig:
    """One load run. Times in seconds."""

    url: str
    endpoint: str = "embeddings"
    concurrency: int = 8
    requests: int = 200
    duration_s: float = 300.0
    """No request starts after this long."""
    timeout_s: float = 60.0
    """Per request."""
    texts: tuple[str, ...] = ()
    synthetic_tokens: tuple[int, int] = (128, 256)
    texts_per_request: int = 1
    max_tokens: int = 16
    """Completions: tokens to generate."""
    model: str | None = None
    """The served model name (default: the first of GET /v1/models)."""
    seed: int = 0
    failover_s: float = 30.0
    """With several URLs: how long a request keeps moving to the next one after connection failures."""
    api_key: str | None = field(default=None, repr=False)
    """Sent as `Authorization: Bearer <key>` (a server with `--api-key-file`)."""
    ca_file: str | None = None
    """PEM certificate (or CA) https URLs must present; None: the system's CAs."""

    def __post_init__(self) -> None:
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"--url {url!r} must be an http(s) URL like http://127.0.0.1:8000 (several: "
                                 f"comma-separated)")
        if self.failover_s < 0:
            raise ValueError(f"--failover {self.failover_s} must be >= 0")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint {self.endpoint!r} must be one of {', '.join(ENDPOINTS)}")
        if self.concurrency < 1 or self.requests < 1 or self.texts_per_request < 1 or self.max_tokens < 1:
            raise ValueError(f"--concurrency {self.concurrency}, --requests {self.requests}, --texts-per-request "
                             f"{self.texts_per_request} and --max-tokens {self.max_tokens} must be >= 1")
        if not (self.duration_s > 0 and self.timeout_s > 0):
            raise ValueError(f"--duration {self.duration_s} and --timeout {self.timeout_s} must be > 0")
        low, high = self.synthetic_tokens
        if not 1 <= low <= high:
            raise ValueError(f"--synthetic-tokens {low}-{high} must be LOW-HIGH with 1 <= LOW <= HIGH")

    @property
    def urls(self) -> tuple[str, ...]:
        """`url` split at commas: the coordinators' base URLs in the succession order."""
        return tuple(u.strip().rstrip("/") for u in self.url.split(",") if u.strip())


@dataclass
class LoadReport:
    """What one run measured. Latencies in ms, from sending a request to reading its whole answer."""

    url: str
    endpoint: str
    concurrency: int
    requests: int
    ok: int
    errors: int
    error_statuses: dict[str, int]
    duration_s: float
    throughput_rps: float
    rows_per_s: float
    latency_ms: dict[str, float]
    batched_with_mean: float | None
    plan_modes: dict[str, int]
    first_error: str | None = None
    failovers: int = 0
    """Requests moved to the next URL after a connection failure (several URLs only)."""

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lat = self.latency_ms
        lines = [f"{self.endpoint} at {self.url}: {self.requests} requests, {self.concurrency} clients, "
                 f"{self.duration_s:.2f} s",
                 f"  throughput {self.throughput_rps:.1f} req/s, {self.rows_per_s:.1f} rows/s",
                 f"  latency ms p50 {lat.get('p50', 0):.1f}  p95 {lat.get('p95', 0):.1f}  p99 {lat.get('p99', 0):.1f}",
                 f"  errors {self.errors}" + (f" {self.error_statuses} (first: {self.first_error})"
                                              if self.errors else "")
                 + (f"; {self.failovers} moves to the next URL" if self.failovers else "")]
        if self.batched_with_mean is not None:
            lines.append(f"  mean requests per engine call {self.batched_with_mean:.2f}; plans {self.plan_modes}")
        return "\n".join(lines)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def synthetic_texts(count: int, tokens: tuple[int, int], seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(*tokens))) for _ in range(count)]


def _body(config: LoadConfig, model: str, texts: list[str], number: int) -> dict:
    if config.endpoint == "embeddings":
        return {"model": model, "input": texts}
    if config.endpoint == "completions":
        return {"model": model, "prompt": texts, "max_tokens": config.max_tokens}
    low, high = config.synthetic_tokens
    seq_len = random.Random(config.seed * 1_000_003 + number).randint(low, high)
    return {"id": f"load{number}", "synthetic": {"batch": config.texts_per_request, "seq_len": seq_len,
                                                 "seed": number}}


async def run_load(config: LoadConfig) -> LoadReport:
    """Run the load and measure it (see the module docstring)."""
    try:
        import httpx
    except ImportError as err:
        raise ImportError("the load generator needs httpx: pip install httpx") from err

    pool = list(config.texts) or synthetic_texts(max(64, config.concurrency * 4), config.synthetic_tokens,
                                                 config.seed)
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    batched: list[int] = []
    modes: Counter[str] = Counter()
    first_error: list[str] = []
    issued = 0
    rows_done = 0
    urls = config.urls
    # One URL: a connection failure is the request's error, not a reason to send it again.
    succession = Succession(urls, config.failover_s, pause_s=0.1, max_attempts=1 if len(urls) == 1 else None)
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)

    async def post(client, path: str, body: dict):
        """POST to the current URL; on a connection failure move to the next (several URLs, `failover_s`)."""
        attempts = succession.start()
        while True:
            try:
                return await client.post(attempts.url() + path, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as err:
                pause_s = attempts.failed(f"{type(err).__name__}: {err}")
                if pause_s is None:
                    raise
                await asyncio.sleep(pause_s)

    headers = {"authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    async with httpx.AsyncClient(timeout=config.timeout_s, limits=limits, headers=headers,
                                 verify=_tls_context(config.ca_file)) as client:
        model = config.model
        if model is None and config.endpoint != "infer":
            reply = await client.get(urls[0] + "/v1/models")
            reply.raise_for_status()
            model = reply.json()["data"][0]["id"]
        start = time.perf_counter()
        deadline = start + config.duration_s

        async def client_loop() -> None:
            nonlocal issued, rows_done
            while issued < config.requests and time.perf_counter() < deadline:
                number = issued
                issued += 1
                texts = [pool[(number * config.texts_per_request + i) % len(pool)]
                         for i in range(config.texts_per_request)]
                body = _body(config, model or "", texts, number)
                sent = time.perf_counter()
                try:
                    reply = await post(client, ENDPOINTS[config.endpoint], body)
                    status = str(reply.status_code)
                    answer = reply.json() if reply.headers.get("content-type", "").startswith("application/json") \
                        else {}
                except httpx.HTTPError as err:
                    status, answer = type(err).__name__, {"error": {"message": str(err)}}
                latencies.append((time.perf_counter() - sent) * 1e3)
                if status == "200":
                    rows_done += config.texts_per_request
                    info = answer.get("edgeprism", {})
                    for call in info.get("calls", [info]):
                        if "batched_with" in call:
                            batched.append(call["batched_with"])
                            modes[call.get("mode", "?")] += 1
                else:
                    statuses[status] += 1
                    if not first_error:
                        error = answer.get("error")
                        first_error.append(f"{status}: {error.get('message') if isinstance(error, dict) else error}")

        await asyncio.gather(*(client_loop() for _ in range(config.concurrency)))
        elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    errors = sum(statuses.values())
    return LoadReport(
        url=config.url, endpoint=config.endpoint, concurrency=config.concurrency, requests=len(latencies),
        ok=len(latencies) - errors, errors=errors, error_statuses=dict(statuses), duration_s=elapsed,
        throughput_rps=(len(latencies) - errors) / elapsed if elapsed > 0 else 0.0,
        rows_per_s=rows_done / elapsed if elapsed > 0 else 0.0,
        latency_ms={"p50": percentile(ordered, 50), "p95": percentile(ordered, 95), "p99": percentile(ordered, 99),
                    "mean": sum(ordered) / len(ordered) if ordered else 0.0, "max": ordered[-1] if ordered else 0.0},
        batched_with_mean=sum(batched) / len(batched) if batched else None, plan_modes=dict(modes),
        first_error=first_error[0] if first_error else None, failovers=succession.failovers)


def _tls_context(ca_file: str | None):
    import ssl

    return ssl.create_default_context(cafile=ca_file) if ca_file else True


def _read_key(path: str) -> str:
    try:
        with open(path) as f:
            key = f.read().strip()
    except OSError as err:
        raise ValueError(f"cannot read the API key from {path}: {err.strerror}") from None
    if not key:
        raise ValueError(f"the API key file {path} is empty")
    return key


def _token_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW-HIGH, e.g. 128-256") from None


def parse_args(argv: list[str] | None = None) -> tuple[LoadConfig, bool]:
    p = argparse.ArgumentParser(prog="python -m edgeprism.api.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000 (only it is contacted); "
                                                "a succession of coordinators: their URLs, comma-separated, in order")
    p.add_argument("--failover", type=float, default=30.0, metavar="SECONDS",
                   help="with several URLs: how long a request keeps trying the next one (default 30)")
    p.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="embeddings")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--requests", type=int, default=200, help="requests in all (default 200)")
    p.add_argument("--duration", type=float, default=300.0, metavar="SECONDS",
                   help="no request starts after this long (default 300)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS", help="per request (default 60)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--texts", metavar="FILE", help="texts, one per line, used in turn")
    source.add_argument("--synthetic-tokens", type=_token_range, default=(128, 256), metavar="LOW-HIGH",
                        help="synthetic texts of LOW..HIGH words (default 128-256); /infer: the sequence length")
    p.add_argument("--texts-per-request", type=int, default=1, help="texts (rows) per request (default 1)")
    p.add_argument("--max-tokens", type=int, default=16, help="completions: tokens to generate (default 16)")
    p.add_argument("--model", help="the served model name (default: the first of GET /v1/models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key-file", metavar="FILE", help="the server's API key (sent as Authorization: Bearer)")
    p.add_argument("--ca-file", metavar="FILE", help="https: the PEM certificate or CA the server must present")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = p.parse_args(argv)
    texts: tuple[str, ...] = ()
    if args.texts:
        try:
            with open(args.texts) as f:
                texts = tuple(line.strip() for line in f if line.strip())
        except OSError as err:
            raise ValueError(f"cannot read texts from {args.texts}: {err.strerror}") from None
        if not texts:
            raise ValueError(f"{args.texts} has no non-blank lines")
    config = LoadConfig(url=args.url, endpoint=args.endpoint, concurrency=args.concurrency, requests=args.requests,
                        duration_s=args.duration, timeout_s=args.timeout, texts=texts,
                        synthetic_tokens=args.synthetic_tokens, texts_per_request=args.texts_per_request,
                        max_tokens=args.max_tokens, model=args.model, seed=args.seed, failover_s=args.failover,
                        api_key=_read_key(args.api_key_file) if args.api_key_file else None, ca_file=args.ca_file)
    return config, args.json


def main(argv: list[str] | None = None) -> int:
    """The command's entry point: this module is run as a program (`python -m`), so it writes its report
    to stdout itself, as cli/ commands do."""
    try:
        config, as_json = parse_args(argv)
        report = asyncio.run(run_load(config))
    except ValueError as err:
        print(f"edgeprism.api.load: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict()) if as_json else str(report), flush=True)
    return 1 if report.ok == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
