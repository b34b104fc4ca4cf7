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

The rule itself (which URL a send goes to, when to move on, pause or give up) is `Succession`, apart from how a
request is sent: the load generator (`edgeprism.api.load`, asyncio over one httpx pool) follows the same one.
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


class Succession:
    """The failover rule over base URLs in the succession order, shared by the requests sent under it (see the
    module docstring): `current` is the URL that answered last, `failovers` counts requests moved off a URL that
    did not answer. A request's sends are an `Attempts` (`start()`). Times in seconds."""

    def __init__(self, urls: tuple[str, ...], retry_for_s: float, pause_s: float,
                 max_attempts: int | None = None) -> None:
        if not (retry_for_s >= 0 and pause_s >= 0):
            raise ValueError(f"retry_for_s {retry_for_s} and pause_s {pause_s} must be >= 0")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts {max_attempts} must be >= 1 (or None: bounded by retry_for_s alone)")
        self.urls, self.retry_for_s, self.pause_s, self.max_attempts = urls, retry_for_s, pause_s, max_attempts
        self.current = 0
        self.failovers = 0

    def start(self) -> Attempts:
        return Attempts(self)


class Attempts:
    """One request's sends under a `Succession`: `url()` before each send, `failed(...)` after one that failed."""

    def __init__(self, succession: Succession) -> None:
        self.succession = succession
        self.sends = 0
        self.tried: dict[str, str] = {}
        """Per URL, why its last send failed."""
        self._index = succession.current
        self._first_failure: float | None = None

    def url(self) -> str:
        """The base URL to send to now (counts the send)."""
        self.sends += 1
        self._index = self.succession.current
        return self.succession.urls[self._index]

    def failed(self, why: str, answered: bool = False) -> float | None:
        """The last send failed: no answer, or (`answered`) an answer to send again to the same URL. -> seconds to
        pause before the next send, or None: the budget is spent (`retry_for_s` since the first failure, or
        `max_attempts` sends). A request that got no answer moves the succession on to the next URL (unless a
        request beside it already has), pausing when a whole round failed: the successor may still be starting."""
        rule = self.succession
        url = rule.urls[self._index]
        self.tried[url] = why
        now = time.monotonic()
        self._first_failure = now if self._first_failure is None else self._first_failure
        if now - self._first_failure > rule.retry_for_s or self.sends == rule.max_attempts:
            return None
        if answered:
            log.info("%s answered %s; sending again", url, why)
            return rule.pause_s
        rule.failovers += 1
        if rule.current == self._index:  # a request beside this one may have moved on already
            rule.current = (self._index + 1) % len(rule.urls)
        log.info("%s did not answer (%s); trying %s", url, why, rule.urls[rule.current])
        return rule.pause_s if rule.current == 0 else 0.0

    def gave_up(self, what: str) -> ConnectionError:
        """The error once the budget is spent without an answer; `what` is the request, e.g. "POST /infer"."""
        spent_s = time.monotonic() - (self._first_failure or time.monotonic())
        return ConnectionError(f"no coordinator answered {what} in {self.sends} send{'s' * (self.sends != 1)} "
                               f"over {spent_s:.1f} s: {self.tried}")


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
        if not timeout_s > 0:
            raise ValueError(f"timeout_s {timeout_s} must be > 0")
        self.succession = Succession(urls, retry_for_s, pause_s, max_attempts)
        self.urls, self.timeout_s, self.retry_server_errors = urls, timeout_s, retry_server_errors
        if api_key is not None and (not api_key.strip() or any(c.isspace() for c in api_key.strip())):
            raise ValueError("api_key must be one word (the content of the server's --api-key-file)")
        self._headers = {"content-type": "application/json"}
        if api_key is not None:
            self._headers["authorization"] = f"Bearer {api_key.strip()}"
        self._tls = ssl.create_default_context(cafile=ca_file) if ca_file else None

    @property
    def failovers(self) -> int:
        """Requests moved to the next URL after one did not answer."""
        return self.succession.failovers

    def post(self, path: str, body: Any) -> Reply:
        return self.request("POST", path, json.dumps(body).encode())

    def get(self, path: str) -> Reply:
        return self.request("GET", path, None)

    def request(self, method: str, path: str, data: bytes | None) -> Reply:
        """The first answer (with `retry_server_errors`: the first below 500, or the last 5xx once the budget
        is spent); ConnectionError naming every URL tried when none answered within the budget."""
        attempts = self.succession.start()
        while True:
            url = attempts.url()
            reply: Reply | None = None
            try:
                reply = self._send(url, method, path, data, attempts.sends)
            except OSError as err:  # no answer: refused, reset, timed out (an HTTPError is an answer, returned)
                pause_s = attempts.failed(f"{type(err).__name__}: {getattr(err, 'reason', err)}")
            else:
                if not (self.retry_server_errors and reply.status >= 500):
                    return reply
                pause_s = attempts.failed(f"HTTP {reply.status}", answered=True)
            if pause_s is None:  # the budget is spent
                if reply is not None:
                    return reply
                raise attempts.gave_up(f"{method} {path}")
            time.sleep(pause_s)

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


__all__ = ["Attempts", "FailoverClient", "Reply", "Succession"]
