"""What keeps the service safe at the HTTP level, apart from the endpoints: the Host allow-list (DNS rebinding), the
body limit on the bytes actually received (not only the declared Content-Length), request-smuggling headers,
security headers on every response, and identity names that cannot hide characters.
"""

from __future__ import annotations

import asyncio
import json
import time
import unicodedata
from typing import Any, Callable, Iterable

from starlette.exceptions import HTTPException

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_NAME = 200
# The page loads nothing from anywhere else and may not be framed (clickjacking); its script and style are inline.
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
       "form-action 'self'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


class BadName(ValueError):
    """An identity name the service refuses (the message says why)."""


def normalize_identity(name: str) -> str:
    """The name as stored and compared: NFC-normalised and stripped. Refused: empty, over MAX_NAME characters,
    slashes, and any control or format character (NUL, newlines, bidi overrides, zero-width joiners...), which
    would make two names look alike or one impossible to type."""
    name = unicodedata.normalize("NFC", name).strip()
    if not name or len(name) > MAX_NAME:
        raise BadName(f"identity must be a name of 1-{MAX_NAME} characters")
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
                or c in "/\\"), None)
    if bad is not None:
        raise BadName(f"identity may not contain {unicodedata.name(bad, f'U+{ord(bad):04X}')} "
                         f"(U+{ord(bad):04X}): use letters, digits, spaces and punctuation")
    return name


def host_of(value: str) -> str:
    """The host of a Host header without its port ("[::1]:8000" -> "::1")."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _json(status: int, message: str) -> tuple[dict, list]:
    body = json.dumps({"error": message, "status": status}).encode()  # as the app's own errors
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), (b"connection", b"close")]
    return {"type": "http.response.start", "status": status, "headers": headers}, [
        {"type": "http.response.body", "body": body}]


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a request's body passes the limit: an HTTPException, so that the form parser
    lets it through (FastAPI turns other errors while parsing into a 400) and the app answers it as JSON 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over the limit of {limit:,} bytes")


class BodyTimeout(HTTPException):
    """Raised from ``receive`` when a body stalls or takes too long (slow clients hold a connection and memory)."""

    def __init__(self, message: str):
        super().__init__(408, message)


class RequestGuard:
    """ASGI middleware: refuse a Host outside ``allowed_hosts`` (400), a request that declares both
    Content-Length and Transfer-Encoding (400: the smuggling signature), a body whose bytes *received* pass
    ``max_body`` (413) whatever its headers said, and a body that stalls ``idle_timeout`` seconds or takes more than
    ``body_timeout`` in all (408); add SECURITY_HEADERS (and no-store on JSON) to every response."""

    def __init__(self, app: Callable, allowed_hosts: Iterable[str], max_body: int, body_timeout: float = 60.0,
                 idle_timeout: float = 10.0):
        self.app, self.allowed = app, {h.lower() for h in allowed_hosts}
        self.max_body, self.body_timeout, self.idle_timeout = max_body, body_timeout, idle_timeout

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self._refuse(headers)
        if refusal is not None:
            return await self._send(send, *refusal)
        received, started, t0 = 0, False, time.monotonic()

        async def counted() -> dict:
            nonlocal received
            left = self.body_timeout - (time.monotonic() - t0)
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(self.idle_timeout, left)))
            except asyncio.TimeoutError:
                raise BodyTimeout(f"the request body stalled or took over {self.body_timeout:g} s; send it "
                                  "whole, at once") from None
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise BodyTooLarge(self.max_body)
            return message

        async def secured(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in have]
                kind = dict(message.get("headers", [])).get(b"content-type", b"")
                if not kind.startswith(b"text/html") and b"cache-control" not in have:
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        try:
            await self.app(scope, counted, secured)
        except (BodyTooLarge, BodyTimeout) as err:  # raised where no handler answered it
            if not started:
                await self._send(send, err.status_code, err.detail)

    def _refuse(self, headers: dict[str, str]) -> Any:
        host = host_of(headers.get("host", ""))
        if host not in self.allowed:
            return 400, (f"Host {host or '(none)'} is not served here (allowed: {', '.join(sorted(self.allowed))}); "
                         "start the service with --allow-host NAME to serve it under that name")
        if "transfer-encoding" in headers and "content-length" in headers:
            return 400, "a request may not carry both Content-Length and Transfer-Encoding"
        return None

    async def _send(self, send: Callable, status: int, message: str) -> None:
        start, bodies = _json(status, message)
        start["headers"] += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
        await send(start)
        for body in bodies:
            await send(body)


class RateLimiter:
    """A token bucket per client address: ``rate`` requests a second on average, bursts of ``burst``.

    For requests without a token (--public-read): one client cannot take the model thread from everyone else.
    Hand-written: the libraries for this (slowapi, limits) bring storage back ends a single process does not need;
    this is the 20 lines of the textbook algorithm. ``clock``: monotonic seconds (tests pass a fake one).
    """

    MAX_CLIENTS = 10_000  # buckets kept; the least recently used go first (a bounded table: addresses are many)

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = float(rate), float(burst), clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, client: str) -> float:
        """0 when the request may go on, else the seconds until it would (the Retry-After)."""
        now = self.clock()
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self._buckets[client] = (tokens - 1 if not wait else tokens, now)  # re-inserted: the newest at the end
        if len(self._buckets) > self.MAX_CLIENTS:
            self._buckets.pop(next(iter(self._buckets)))
        return wait
