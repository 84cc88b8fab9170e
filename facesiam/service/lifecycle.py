"""The service's end: what SIGTERM (every rolling update, every eviction) and SIGINT do.

    signal      with --drain-delay d: for d seconds /readyz answers 503 while every request is still served as usual
                (a load balancer, or Kubernetes' endpoints, takes a probe period or two to stop sending here: a
                preStop sleep built in); then
    (delay)     draining: /readyz answers 503 (a load balancer stops sending here), new requests 503 with
                Retry-After (a JSON error), /healthz stays 200 (the process lives); the micro-batcher stops holding
                batches back for company; the requests in flight run to their end
    drained     uvicorn's own shutdown: the listening socket closed (new connections refused), idle keep-alive
                connections closed; then the app's lifespan ends: the batcher finishes what is queued, the gallery
                database is closed (SQLite: its WAL checkpointed into the file; PostgreSQL: the connection and the
                listener thread)                                                                  -> exit status 0
    --grace s   past the signal (and the delay) with requests still running: uvicorn cancels them (each answered
                503 when its answer had not begun), serve logs one line saying how many were cut and exits with
                CUT_EXIT_STATUS; a second signal cuts at once

uvicorn does the shutdown itself (``Server.should_exit``, ``timeout_graceful_shutdown`` cancelling what is still
running, the lifespan's end). Written here is what it lacks: uvicorn closes its listening socket the moment a signal
arrives, so a load balancer that has not yet seen /readyz fail gets "connection refused" and a keep-alive client a
reset, and nothing tells the batcher to stop waiting for company; and uvicorn re-raises the signal after a clean
shutdown (exit status 143), where an orchestrator expects 0, and cannot say how many requests it cut.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from typing import Callable, Optional

from starlette.responses import JSONResponse

from .hardening import SECURITY_HEADERS

log = logging.getLogger("facesiam.serve")

PROBES = ("/healthz", "/readyz")  # answered while draining, and not counted as work in flight
RETRY_AFTER = 5  # seconds a refused client waits: a restart takes seconds (docs/benchmarks.md: restart to ready)
CUT_EXIT_STATUS = 1  # the grace period ran out with requests in flight (commands' expected failures exit 1 too)


class Drain:
    """Whether the service is draining, and the requests it is serving (the probes not counted)."""

    def __init__(self, grace: float = 20.0, clock: Callable[[], float] = time.monotonic, delay: float = 0.0):
        self.grace, self.clock, self.delay = grace, clock, delay
        self.since: Optional[float] = None  # when the signal came (clock seconds)
        self.deadline = math.inf  # when requests still running are cut (the signal + delay + grace)
        self.why = ""
        self.in_flight = 0  # requests inside the app now
        self.cut = 0  # requests cancelled at the deadline

    @property
    def draining(self) -> bool:
        """A signal came: not ready (/readyz 503), whether or not new requests are refused yet."""
        return self.since is not None

    @property
    def refusing(self) -> bool:
        """New requests get 503: the delay after the signal is over (or a second signal cut it short)."""
        return self.since is not None and self.clock() >= min(self.since + self.delay, self.deadline)

    def begin(self, why: str) -> None:
        """Start draining; a second call cuts at once. Only sets attributes: safe in a signal handler."""
        now = self.clock()
        if self.since is None:
            self.since, self.deadline, self.why = now, now + self.delay + self.grace, why
        else:
            self.deadline = now

    def done(self) -> bool:
        """Draining, past the delay, and nothing left to wait for: no request in flight, or the grace period over."""
        return self.refusing and (self.in_flight == 0 or self.clock() >= self.deadline)

    def left(self) -> float:
        """Seconds of the grace period left (0 when over)."""
        return max(0.0, self.deadline - self.clock())


class DrainGate:
    """ASGI middleware: counts the requests in flight and, while draining, answers every new one but the probes 503
    with Retry-After (the connection closed after it, so a client's next try goes to a fresh connection: elsewhere,
    behind a load balancer). A request cancelled at the end of the grace period counts as cut, and is answered 503
    too when its answer had not begun."""

    def __init__(self, app: Callable, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            return await self.app(scope, receive, send)
        drain = self.drain
        if drain.refusing:
            return await _unavailable("the service is shutting down; retry (another instance, or this one once it "
                                      "has restarted)")(scope, receive, send)
        started = False

        async def sent(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        drain.in_flight += 1
        try:
            await self.app(scope, receive, sent)
        except asyncio.CancelledError:
            drain.cut += 1
            if started:
                raise
            # Answered and not re-raised: uvicorn would log a traceback for each cut request and answer it 500, but a
            # cut at the end of a drain is neither a bug nor a server error, and the client may retry it elsewhere
            # (a write still running after the grace period: it committed or not, as when a connection drops).
            await _unavailable(f"the service shut down before this request finished (its grace period of "
                               f"{drain.grace:g} s was over); retry")(scope, receive, send)
        finally:
            drain.in_flight -= 1


def _unavailable(message: str) -> JSONResponse:
    """503 as the app's other errors (JSON, the security headers), with Retry-After, closing the connection."""
    return JSONResponse({"error": message, "status": 503}, status_code=503,
                        headers={**SECURITY_HEADERS, "cache-control": "no-store", "retry-after": str(RETRY_AFTER),
                                 "connection": "close"})


def graceful_server(config, drain: Drain, on_drain: Callable[[], None]):
    """A uvicorn Server (``config``: a uvicorn.Config) whose SIGTERM and SIGINT start ``drain`` instead of closing
    the socket at once; ``on_drain`` runs on the event loop when draining begins (the batcher's hurry). uvicorn's own
    shutdown follows once nothing is in flight or the grace period is over: ``timeout_graceful_shutdown`` is what is
    left of it, so uvicorn cancels whatever still runs then."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        announced = hurried = False

        def handle_exit(self, sig: int, frame) -> None:
            # instead of uvicorn's: its should_exit closes the socket at once, and the signal it records is
            # re-raised after the shutdown (exit status 143 or 130 for a clean stop)
            drain.begin(signal.Signals(sig).name)

        async def on_tick(self, counter: int) -> bool:
            if await super().on_tick(counter):  # should_exit set elsewhere, or --limit-max-requests
                return True
            if not drain.draining:
                return False
            if not self.announced:  # logged here, not in the signal handler: logging takes locks
                self.announced = True
                if drain.delay:
                    log.info("%s: /readyz 503; requests still served for %g s (--drain-delay), then draining",
                             drain.why, drain.delay)
            if not drain.refusing:
                return False
            if not self.hurried:
                self.hurried = True
                log.info("%s: draining: %d request(s) in flight finish within %g s; new ones get 503, /readyz 503",
                         drain.why, drain.in_flight, drain.grace)
                on_drain()
            if not drain.done():
                return False
            self.config.timeout_graceful_shutdown = drain.left()
            self.should_exit = True
            return True

    return GracefulServer(config)
