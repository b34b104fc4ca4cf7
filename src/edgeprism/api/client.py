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


class FailoverClient:
    """POST/GET JSON against the first of `urls` that answers (see the module docstring). Times in seconds."""

    def __init__(self, urls: list[str] | tuple[str, ...], timeout_s: float = 60.0, retry_for_s: float = 30.0,
                 pause_s: float = 0.25, api_key: str | None = None, ca_file: str | None = None) -> None:
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
        self.urls, self.timeout_s, self.retry_for_s, self.pause_s = urls, timeout_s, retry_for_s, pause_s
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
        """ConnectionError naming every URL tried when none answered within `retry_for_s`."""
        first_failure: float | None = None
        tried: dict[str, str] = {}
        while True:
            url = self.urls[self.current]
            try:
                return self._send(url, method, path, data)
            except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
                if isinstance(err, urllib.error.HTTPError):  # an answer; _send returns those
                    raise
                tried[url] = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                if now - first_failure > self.retry_for_s:
                    raise ConnectionError(f"no coordinator answered {method} {path} within {self.retry_for_s:.0f} "
                                          f"s: {tried}") from None
                self.current = (self.current + 1) % len(self.urls)
                self.failovers += 1
                log.info("%s did not answer (%s); trying %s", url, tried[url], self.urls[self.current])
                if self.current == 0:
                    time.sleep(self.pause_s)  # a whole round failed: the successor may still be starting

    def _send(self, url: str, method: str, path: str, data: bytes | None) -> Reply:
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
        return Reply(url, status, body)


__all__ = ["FailoverClient", "Reply"]
