"""What keeps the service safe at the HTTP level, apart from the endpoints: the Host allow-list (DNS rebinding), the
body limit on the bytes actually received (not only the declared Content-Length), request-smuggling headers,
security headers on every response, and identity names that cannot hide characters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import unicodedata
from typing import Any, Callable, Iterable

from starlette.exceptions import HTTPException

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_NAME = 200
BODY_LIMIT = "facesiam.body_limit"  # the request scope's key for its endpoint's byte limit (set by app.py's guard)
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


# Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt): characters drawn as nothing (variation
# selectors, the combining grapheme joiner, Hangul fillers...). Written out because unicodedata has no such property
# and the list is short and stable; U+2800 (the blank Braille pattern) is drawn as nothing too.
_INVISIBLE = ((0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
              (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x2800, 0x2800),
              (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8),
              (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))
# scripts that are written together in one name (Japanese, Korean); any other mix of scripts is refused
_SCRIPTS_TOGETHER = ({"CJK", "HIRAGANA", "KATAKANA"}, {"CJK", "HANGUL"})


def _invisible(c: str) -> bool:
    return any(lo <= ord(c) <= hi for lo, hi in _INVISIBLE)


def _script(c: str) -> str:
    """A letter's script, from its Unicode name ("CYRILLIC SMALL LETTER A" -> CYRILLIC): enough to tell Latin from
    Cyrillic or Greek look-alikes without a script database."""
    return unicodedata.name(c, "?").split()[0]


def identity_key(name: str) -> str:
    """What two names must not share to be told apart: NFKC with case folded (fullwidth letters, ligatures and
    no-break spaces fold onto plain ones, "Alice" onto "alice"). The store refuses a new name whose key is taken."""
    return " ".join(unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold()).split())


def normalize_identity(name: str) -> str:
    """The name as stored and compared: NFC-normalised and stripped. Refused: empty, over MAX_NAME characters,
    slashes, "." and "..", any control, format or invisible character (NUL, newlines, bidi overrides, zero-width
    joiners, variation selectors, Hangul fillers...), spaces other than the plain one, a name without a letter or
    digit or starting with a combining mark, and letters of scripts that are not written together (a Cyrillic "а"
    in a Latin name): each would make two names look alike or one impossible to type."""
    name = unicodedata.normalize("NFC", name).strip()
    if not name or len(name) > MAX_NAME:
        raise BadName(f"identity must be a name of 1-{MAX_NAME} characters")
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
                or (unicodedata.category(c) == "Zs" and c != " ") or _invisible(c) or c in "/\\"), None)
    if bad is not None:
        raise BadName(f"identity may not contain {unicodedata.name(bad, f'U+{ord(bad):04X}')} "
                      f"(U+{ord(bad):04X}): use letters, digits, spaces and punctuation")
    if name in (".", "..") or unicodedata.category(name[0]).startswith("M") or \
            not any(unicodedata.category(c)[0] in "LN" for c in name):
        raise BadName("identity must hold a letter or digit, and may not start with a combining mark or be . or ..")
    scripts = {_script(c) for c in unicodedata.normalize("NFKC", name) if unicodedata.category(c).startswith("L")}
    if len(scripts) > 1 and not any(scripts <= together for together in _SCRIPTS_TOGETHER):
        raise BadName(f"identity mixes the {', '.join(sorted(scripts))} scripts, which makes look-alike names "
                      "(a Cyrillic a for a Latin one); write it in one script")
    return name


def host_of(value: str) -> str:
    """The host of a Host header without its port ("[::1]:8000" -> "::1"); "" when the header is malformed (a
    port that is not a number: "localhost:evil"), which no allow-list holds."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
    elif value.count(":") == 1:
        host, rest = value.split(":")[0], ":" + value.split(":")[1]
    else:
        host, rest = value, ""
    if rest and not (rest.startswith(":") and rest[1:].isdigit() and rest[1:].isascii()):
        return ""
    return host


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
        limit = scope.get(BODY_LIMIT, self.max_body)

        async def counted() -> dict:
            nonlocal received
            left = self.body_timeout - (time.monotonic() - t0)
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(self.idle_timeout, left)))
            except asyncio.TimeoutError:
                raise BodyTimeout(f"the request body stalled or took over {self.body_timeout:g} s; send it "
                                  "whole, at once") from None
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
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


KEEP_ALIVE = 5  # seconds an idle connection stays open between two requests
MAX_HEAD_BYTES = 16 * 1024  # a request line and headers larger than this are refused (h11's buffer)


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline for a request's line and headers: a connection that sends nothing,
    or dribbles a header a byte at a time (slowloris), is closed ``seconds`` after it opened or after its last
    request was answered. uvicorn has keep-alive and body timeouts (RequestGuard) but none for the head; this is
    the few lines that add one."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _head_timer = None

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(seconds, self._head_too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm()  # a head begun but not finished: the deadline runs from its first byte
            else:
                self._disarm()

        def on_response_complete(self) -> None:
            self._disarm()  # the keep-alive timeout takes over until the next request's first byte
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


class AccessLogWithoutQuery(logging.Filter):
    """uvicorn's access log lines without the query string: a token or a name sent there must not reach the log
    (uvicorn.access records carry (client, method, path?query, version, status) as their args)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?…", *args[3:])
        return True


class RateLimiter:
    """A token bucket per client address: ``rate`` requests a second on average, bursts of ``burst``.

    For requests without a token (--public-read): one client cannot take the model thread from everyone else
    (one bucket counts requests, another the work they ask for: megapixels x faces).
    Hand-written: the libraries for this (slowapi, limits) bring storage back ends a single process does not need;
    this is the 20 lines of the textbook algorithm. ``clock``: monotonic seconds (tests pass a fake one).
    """

    MAX_CLIENTS = 10_000  # buckets kept; the least recently used go first (a bounded table: addresses are many)

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = float(rate), float(burst), clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, client: str, cost: float = 1.0) -> float:
        """0 when a request of ``cost`` tokens may go on (and they are taken), else the seconds until it would (the
        Retry-After). ``cost=0`` asks only whether the client is out of debt (see ``charge``)."""
        tokens = self._refilled(client)
        wait = 0.0 if tokens >= cost else (cost - tokens) / self.rate
        self._put(client, tokens - cost if not wait else tokens)
        return wait

    def charge(self, client: str, cost: float) -> None:
        """Take ``cost`` tokens for work already done, into debt if need be: the client waits it off before its
        next request (the cost of a photo is known only once it is decoded and its faces found)."""
        self._put(client, self._refilled(client) - cost)

    def _refilled(self, client: str) -> float:
        now = self.clock()
        tokens, last = self._buckets.pop(client, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def _put(self, client: str, tokens: float) -> None:
        self._buckets[client] = (tokens, self.clock())  # re-inserted: the newest at the end
        if len(self._buckets) > self.MAX_CLIENTS:
            self._buckets.pop(next(iter(self._buckets)))
