"""A client that follows a cluster's coordinator: several base URLs, in the succession order.

    from edgeprism.api.client import FailoverClient
    client = FailoverClient(["http://192.168.1.10:8000", "http://192.168.1.11:8000"], retry_for_s=30)
    reply = client.post("/v1/embeddings", {"input": ["a passage"]})   # reply.url, reply.status, reply.body

A request goes to the URL that answered last; on a connection failure (refused, reset, timed out before
an answer) it goes to the next one in the list, round and round until one answers or `retry_for_s` has
passed since the first failure. An HTTP answer of any status (4xx, 5xx) is an answer: it is returned, not
retried elsewhere (the server saw the request). A request whose connection broke after it was sent may
have run on the dead coordinator; every edgeprism request is idempotent (no state changes), so sending it
again is safe. `api_key` is sent as `Authorization: Bearer <key>` to every URL (a server started with
`--api-key-file`); `ca_file` is the PEM certificate (or CA) that https URLs must present (a self-signed
server certificate), default: the system's CAs. The module uses only the standard library and no other
edgeprism module: a client machine without edgeprism's `serve` extra can copy this one file.

Two knobs make it the load client of a fault run as well (`edgeprism.bench.chaos_client`): with
`retry_server_errors` a 5xx answer is sent again to the same URL, `pause_s` later (a 4xx stays final), and
the last 5xx is returned when the budget is spent; `max_attempts` bounds the sends of one request (retries
and moves to the next URL included) beside `retry_for_s`. `Reply.attempts` says how many sends it took.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    url: str
    """The base URL that answered."""
    status: int
    body: Any
    """The JSON answer (or the text, when it is not JSON)."""
    attempts: int = 1
    """Sends this request took: retries and moves to the next URL included."""


class FailoverClient:
    """POST/GET JSON against the first of `urls` that answers (see the module docstring). Times in seconds."""

    def __init__(self, urls: list[str] | tuple[str, ...], timeout_s: float = 60.0, retry_for_s: float = 30.0,
                 pause_s: float = 0.25, api_key: str | None = None, ca_file: str | None = None,
                 retry_server_errors: bool = False, max_attempts: int | None = None) -> None:
        urls = tuple(u.rstrip("/") for u in urls)
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"base URL {url!r} must be an http(s) URL like http://127.0.0.1:8000")
        if not urls:
            raise ValueError("give at least one base URL")
        if not (timeout_s > 0 and retry_for_s >= 0 and pause_s >= 0):
            raise ValueError(f"timeout_s {timeout_s} must be > 0, retry_for_s {retry_for_s} and pause_s {pause_s} "
                             f">= 0")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts {max_attempts} must be >= 1 (or None: bounded by retry_for_s alone)")
        self.urls, self.timeout_s, self.retry_for_s, self.pause_s = urls, timeout_s, retry_for_s, pause_s
        self.retry_server_errors, self.max_attempts = retry_server_errors, max_attempts
        if api_key is not None and (not api_key.strip() or any(c.isspace() for c in api_key.strip())):
            raise ValueError("api_key must be one word (the content of the server's --api-key-file)")
        self._headers = {"content-type": "application/json"}
        if api_key is not None:
            self._headers["authorization"] = f"Bearer {api_key.strip()}"
        self._tls = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self.current = 0
        """Index of the URL that answered last."""
        self.failovers = 0

    def post(self, path: str, body: Any) -> Reply:
        return self.request("POST", path, json.dumps(body).encode())

    def get(self, path: str) -> Reply:
        return self.request("GET", path, None)

    def request(self, method: str, path: str, data: bytes | None) -> Reply:
        """The first answer (with `retry_server_errors`: the first below 500, or the last 5xx once the budget
        is spent); ConnectionError naming every URL tried when none answered within the budget."""
        first_failure: float | None = None
        tried: dict[str, str] = {}
        sends = 0
        while True:
            url = self.urls[self.current]
            sends += 1
            reply: Reply | None = None
            try:
                reply = self._send(url, method, path, data, sends)
            except OSError as err:  # no answer: refused, reset, timed out (an HTTPError is an answer, returned)
                tried[url] = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            else:
                if not (self.retry_server_errors and reply.status >= 500):
                    return reply
                tried[url] = f"HTTP {reply.status}"
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            if now - first_failure > self.retry_for_s or sends == self.max_attempts:  # the budget is spent
                if reply is not None:
                    return reply
                raise ConnectionError(f"no coordinator answered {method} {path} in {sends} "
                                      f"send{'s' * (sends != 1)} over {now - first_failure:.1f} s: {tried}")
            if reply is not None:
                log.info("%s answered %d; sending again", url, reply.status)
                time.sleep(self.pause_s)
                continue
            self.current = (self.current + 1) % len(self.urls)
            self.failovers += 1
            log.info("%s did not answer (%s); trying %s", url, tried[url], self.urls[self.current])
            if self.current == 0:
                time.sleep(self.pause_s)  # a whole round failed: the successor may still be starting

    def _send(self, url: str, method: str, path: str, data: bytes | None, attempts: int) -> Reply:
        request = urllib.request.Request(url + path, data=data, method=method, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self._tls) as reply:
                status, text = reply.status, reply.read()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text.decode(errors="replace")
        return Reply(url, status, body, attempts)


__all__ = ["FailoverClient", "Reply"]
