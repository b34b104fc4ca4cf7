"""Who may use the HTTP API: a bearer API key, TLS, and the rule that keeps an open API off the network.

    access = HttpAccess(api_key_file="api.key", tls_cert_file="cert.pem", tls_key_file="key.pem")
    serve_http(engine, io, "192.168.1.10", 8000, access=access)

- **API key.** With `api_key_file`, every request but GET /health (and GET /metrics when `metrics_open`)
  must carry `Authorization: Bearer <key>`, the header OpenAI's clients send (`OpenAI(api_key=...)`).
  The key is the file's content without surrounding whitespace (at least 16 characters); it is compared
  in constant time (`hmac.compare_digest`). A request without it, or with another key, is answered 401
  in OpenAI's error shape (code `missing_api_key` / `invalid_api_key`, never echoing what was sent),
  before its body is read, and counted in /metrics (`edgeprism_http_unauthorized_total`).
- **TLS.** With `tls_cert_file` and `tls_key_file` (PEM), uvicorn serves HTTPS (`ssl_certfile`,
  `ssl_keyfile`). Without TLS a key crosses the network in clear: off loopback, use both.
- **Off loopback.** `check_exposure` refuses to serve on an address other than loopback with neither an
  API key nor `insecure` (`--http-insecure`: open on purpose, e.g. behind a proxy that authenticates).

Only paths cross machines: a failover cluster's spec carries `HttpAccess.to_service()` (the file paths),
never the key, and a promoted coordinator reads the files at those paths on its own disk.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from edgeprism.api.errors import ApiError

log = logging.getLogger(__name__)

MIN_KEY_CHARS = 16
"""Shortest API key accepted: 16 characters (e.g. `openssl rand -hex 16` gives 32)."""
OPEN_PATHS = frozenset({"/health"})
"""Paths served without a key: a liveness probe (it shows the model name and the cluster's size)."""
MAKE_KEY_HINT = "openssl rand -hex 32 > api.key && chmod 600 api.key"


@dataclass(frozen=True)
class HttpAccess:
    """How the HTTP API is protected. Paths are files on the machine that serves."""

    api_key_file: str | None = None
    """A file holding the API key clients send as `Authorization: Bearer <key>`; None: no key asked."""
    metrics_open: bool = False
    """Serve GET /metrics without the key (a Prometheus scraper without credentials)."""
    tls_cert_file: str | None = None
    """PEM certificate (chain) to serve HTTPS with; needs `tls_key_file`."""
    tls_key_file: str | None = None
    """PEM private key of `tls_cert_file`."""
    insecure: bool = False
    """Allow serving without an API key on an address other than loopback (`--http-insecure`)."""

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(f"TLS needs both a certificate and its key: got certificate {self.tls_cert_file!r} and "
                             f"key {self.tls_key_file!r} (--tls-cert FILE --tls-key FILE)")

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    def open_paths(self) -> frozenset[str]:
        return OPEN_PATHS | ({"/metrics"} if self.metrics_open else set())

    def to_service(self) -> dict[str, Any]:
        """The fields as JSON (paths and flags only: what a failover spec carries)."""
        return asdict(self)

    @classmethod
    def from_service(cls, data: dict[str, Any] | None) -> HttpAccess:
        """From `to_service()`; None or {}: no protection (a spec of a coordinator without these settings)."""
        return cls(**(data or {}))


def load_api_key(path: str | os.PathLike) -> bytes:
    """The key in `path` (surrounding whitespace removed); ValueError naming the file's problem."""
    try:
        with open(path, "rb") as f:
            key = f.read(4096).strip()
        mode = os.stat(path).st_mode
    except OSError as err:
        raise ValueError(f"cannot read the API key file {path}: {err.strerror}") from None
    if len(key) < MIN_KEY_CHARS or any(c <= 32 or c > 126 for c in key):
        raise ValueError(f"the API key file {path} holds {len(key)} characters; it needs one key of at least "
                         f"{MIN_KEY_CHARS} printable characters without spaces (`{MAKE_KEY_HINT}`)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the API key file %s is readable by other users (mode %o): chmod 600 %s", path,
                    stat.S_IMODE(mode), path)
    return key


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1); False for every other name or address."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, port: int, access: HttpAccess) -> None:
    """ValueError when serving on `host` would open the API to the network by accident; a warning when on purpose."""
    if is_loopback(host):
        return
    if access.api_key_file is None and not access.insecure:
        raise ValueError(
            f"refusing to serve the HTTP API on {host}:{port} without an API key: anyone on that network could run "
            f"requests and read the answers. Give --api-key-file FILE (`{MAKE_KEY_HINT}`; clients send "
            f"`Authorization: Bearer <key>`), best with --tls-cert/--tls-key, or --http-insecure to serve it open on "
            f"purpose (e.g. behind a proxy that authenticates), or --host 127.0.0.1")
    if access.api_key_file is None:
        log.warning("serving on %s:%d with --http-insecure: the API has no authentication; anyone who can reach it "
                    "can run requests", host, port)
    elif not access.tls:
        log.warning("serving on %s:%d without TLS: the API key and every request cross the network in clear "
                    "(--tls-cert/--tls-key)", host, port)


class BearerAuth:
    """ASGI middleware: HTTP requests to paths outside `open_paths` need `Authorization: Bearer <key>`.
    `on_refused(path, code)` is told of each refusal (the app counts it). Lifespan events pass through."""

    def __init__(self, app: ASGIApp, key: bytes, open_paths: frozenset[str],
                 on_refused: Callable[[str, str], None] = lambda path, code: None) -> None:
        self.app, self.key, self.open_paths, self.on_refused = app, key, open_paths, on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.open_paths:  # the API has no websockets
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(dict(scope.get("headers") or ()).get(b"authorization"))
        if refusal is None:
            await self.app(scope, receive, send)
            return
        self.on_refused(str(scope.get("path")), refusal.code)
        response = refusal.response()
        response.headers["WWW-Authenticate"] = 'Bearer realm="edgeprism"'
        await response(scope, receive, send)

    def refusal(self, header: bytes | None) -> ApiError | None:
        """None when `header` (the raw Authorization value) carries the key, else the 401 to answer."""
        scheme, _, given = (header or b"").strip().partition(b" ")
        if header is None or scheme.lower() != b"bearer" or not given.strip():
            return ApiError(401, "You didn't provide an API key. Send it in an Authorization header using Bearer "
                                 "auth (Authorization: Bearer YOUR_KEY); the server's --api-key-file holds it.",
                            "missing_api_key")
        if not hmac.compare_digest(given.strip(), self.key):
            return ApiError(401, "Incorrect API key provided. Use the key in the server's --api-key-file.",
                            "invalid_api_key")
        return None


__all__ = ["BearerAuth", "HttpAccess", "check_exposure", "is_loopback", "load_api_key"]
