"""The middleware in front of every route, and the API key check the ``/v1`` routes depend on.

:class:`GuardMiddleware`, one pure ASGI middleware: the request body limit (413), the rate limit
per client (429, ``/v1`` only), the access log line and the request metrics. :func:`key_is_valid`
and :func:`client_key` decide who a request comes from, for the key check
(:func:`app.service.dependencies.require_key`), the rate limit and the per-client cohort limit.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time

from app.service.state import ServiceMetrics
from app.settings import Settings

__all__ = ["GuardMiddleware", "client_key", "key_is_valid"]

log = logging.getLogger("synthehr.api")


def key_is_valid(key: str | bytes | None, expected: str) -> bool:
    """Constant-time check of an ``X-API-Key`` value, compared as bytes: a header may carry
    any byte (Starlette hands it over as Latin-1 text, which encodes back to the raw bytes),
    and ``compare_digest`` refuses non-ASCII ``str``, which used to turn such a key into a
    500 instead of a 401. The deployment's key is compared as UTF-8."""
    if not key:
        return False
    if isinstance(key, str):
        try:
            key = key.encode("latin-1")
        except UnicodeEncodeError:
            key = key.encode("utf-8")
    return secrets.compare_digest(key, expected.encode("utf-8"))


def client_key(headers: dict[bytes, bytes], client: tuple | None, api_key: str | None) -> str:
    """The rate limiter's bucket for a request: the API key's hash when it is the valid key,
    else the client's address. An invalid key never gets a bucket of its own, so rotating
    the header does not escape the limit."""
    given = headers.get(b"x-api-key")
    if api_key and given and key_is_valid(given, api_key):
        return "key:" + hashlib.sha256(given).hexdigest()[:16]
    return "addr:" + str((client or ("?",))[0])


class _Buckets:
    """Token buckets per client: ``rate`` per minute, ``burst`` at once."""

    def __init__(self, per_minute: int, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when allowed, else the seconds to wait."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._state.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._state[key] = (tokens - 1.0, now)
                if len(self._state) > 100_000:
                    self._state.clear()
                return 0.0
            self._state[key] = (tokens, now)
            return (1.0 - tokens) / self.rate if self.rate > 0 else 60.0


class GuardMiddleware:
    """Request body limit (413), rate limit (429), access log line and request metrics."""

    def __init__(self, app, settings: Settings, metrics: ServiceMetrics) -> None:
        self.app = app
        self.max_bytes = settings.max_request_bytes
        self.buckets = (_Buckets(settings.rate_limit_per_minute, settings.rate_limit_burst)
                        if settings.rate_limit_per_minute > 0 else None)
        self.metrics = metrics
        self.api_key = settings.api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        status_holder = {"status": 500}
        limited = path.startswith("/v1/")

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        headers = dict(scope.get("headers") or [])
        if limited and self.buckets is not None:
            wait = self.buckets.take(client_key(headers, scope.get("client"), self.api_key))
            if wait > 0:
                await _plain(send_wrapper, 429, "rate limit exceeded; retry later",
                             [(b"retry-after", str(max(1, round(wait))).encode())])
                self._observe(scope, started, status_holder["status"])
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _plain(send_wrapper, 413, f"request body over {self.max_bytes} bytes")
            self._observe(scope, started, status_holder["status"])
            return
        received = 0
        max_bytes = self.max_bytes

        async def receive_wrapper():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except _TooLarge:
            await _plain(send_wrapper, 413, f"request body over {self.max_bytes} bytes")
        finally:
            self._observe(scope, started, status_holder["status"])

    def _observe(self, scope, started: float, status: int) -> None:
        route = scope.get("route")
        name = getattr(route, "path", None) or ("/static" if scope["path"].startswith(
            "/static-offline-docs") else "unmatched")
        seconds = time.perf_counter() - started
        self.metrics.requests.labels(scope["method"], name, str(status)).inc()
        self.metrics.latency.labels(scope["method"], name).observe(seconds)
        level = (logging.ERROR if status >= 500 and status != 503 else
                 logging.WARNING if status == 503 else logging.DEBUG)
        if log.isEnabledFor(level):
            log.log(level, "request",
                    extra={"method": scope["method"], "path": scope["path"], "status": status,
                           "ms": round(seconds * 1000, 2)})


class _TooLarge(Exception):
    pass


async def _plain(send, status: int, message: str, extra: list | None = None) -> None:
    body = ('{"detail":"' + message + '"}').encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})
