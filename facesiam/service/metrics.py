"""What an operator's monitoring scrapes (GET /metrics, Prometheus' text format) and the access log.

``ServiceMetrics`` holds one CollectorRegistry per app (not prometheus_client's global one: tests build many apps in
one process, and two services in a process must not add up): requests by route template, method and status; the
per-stage latencies the endpoints already time (``Timer``: decode, detect, embed, search); micro-batch sizes;
database statement round trips; token refusals by scope. The gallery (faces, identities, index kind) and the batch
queue depth are read when scraped, by a collector, not updated on every request.

``RequestRecorder`` is the one place a request's outcome is recorded: it counts it for /metrics and, with
``--log-format json``, writes its access-log line (request id, method, route template, status, ms: never the raw
path, its query string or a token; an identity's name only with ``--log-identities``). The text access log stays
uvicorn's own, through hardening.AccessLogWithoutQuery.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest, start_http_server
from starlette.routing import Match

from ..errors import InputError

access_log = logging.getLogger("facesiam.access")

# seconds: a stage takes from about a millisecond (search, a small decode) to seconds (a large photo on a CPU)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DB_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
UNMATCHED = "(unmatched)"  # the route label of a path no route serves: raw paths would make labels without bound
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}  # any other method token: "other" (bounded)
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a client's X-Request-ID kept as is only when it is this plain
__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics", "RequestRecorder", "start_metrics_server"]


class ServiceMetrics:
    """The service's metrics in their own registry; ``text()`` is the /metrics page."""

    def __init__(self, store, batcher, drain=None):
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("facesiam_requests", "HTTP requests answered, by route template, method and status",
                                ("route", "method", "status"), registry=registry)
        self.stages = Histogram("facesiam_stage_seconds", "Time a request spent in one stage (decode: per image; "
                                "detect, embed: per model pass it waited on; search: per index search)", ("stage",),
                                buckets=STAGE_BUCKETS, registry=registry)
        self.batches = Histogram("facesiam_batch_size", "Images in one micro-batch (one network pass)",
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry)
        self.database = Histogram("facesiam_database_seconds", "Round trip of one gallery database statement",
                                  buckets=DB_BUCKETS, registry=registry)
        self.refusals = Counter("facesiam_auth_refusals", "Requests refused by the token check, by the scope the "
                                "route needs and the status (401: no token, 403: wrong token or scope, 429: public "
                                "rate limit)", ("scope", "status"), registry=registry)
        registry.register(_ScrapeTime(store, batcher, drain))
        batcher.on_batch = self.batches.observe
        store.on_statement(self.database.observe)

    def stage(self, name: str, ms: float) -> None:
        """A Timer's sink: ``decode_ms`` -> the decode stage's histogram."""
        self.stages.labels(name.removesuffix("_ms")).observe(ms / 1000.0)

    def refused(self, scope: str, status: int) -> None:
        self.refusals.labels(scope, str(status)).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _ScrapeTime:
    """The gauges read when scraped: the gallery's faces and identities, the index kind, the queue depth, the
    requests in flight and whether the service is draining (service/lifecycle.py's Drain)."""

    def __init__(self, store, batcher, drain=None):
        self.store, self.batcher, self.drain = store, batcher, drain

    def describe(self):
        return []  # read at scrape time only (describing would call collect() at registration)

    def collect(self):
        store = self.store
        yield GaugeMetricFamily("facesiam_gallery_faces", "Faces in the gallery's search index", value=store.size)
        yield GaugeMetricFamily("facesiam_gallery_identities", "Enrolled identities",
                                value=len(store.identities()))
        index = InfoMetricFamily("facesiam_index", "The gallery's search index in memory")
        index.add_metric([], {"kind": store.index_kind})
        yield index
        yield GaugeMetricFamily("facesiam_batch_queue_depth", "Images waiting for the model thread",
                                value=self.batcher.queued)
        if self.drain is not None:
            yield GaugeMetricFamily("facesiam_requests_in_flight", "Requests being served, this scrape included "
                                    "(/healthz and /readyz not counted)", value=self.drain.in_flight)
            yield GaugeMetricFamily("facesiam_draining", "1 after SIGTERM or SIGINT, while requests in flight finish",
                                    value=int(self.drain.draining))


def route_of(routes: list, scope: dict) -> tuple[str, dict]:
    """(the template of the route serving this request, e.g. /identities/{name}; its path parameters): the route
    the router chose, else (a refusal before routing) the one of ``routes`` that matches."""
    if getattr(scope.get("route"), "path", None):
        return scope["route"].path, scope.get("path_params", {})
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", UNMATCHED), child.get("path_params", {})
    return UNMATCHED, {}


class RequestRecorder:
    """ASGI middleware, outermost: every answer (the guards' refusals included) counted by route template and
    status, and with ``json_log`` written as one JSON access-log line. Each response carries its X-Request-ID (the
    client's when it sent a plain one, else a new one), which the log line names too."""

    def __init__(self, app: Callable, *, metrics: ServiceMetrics, routes: list, json_log: bool = False,
                 log_identities: bool = False):
        self.app, self.metrics, self.routes = app, metrics, routes
        self.json_log, self.log_identities = json_log, log_identities

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500  # an exception that escapes the app is answered 500 outside
        given = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex

        async def sent(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route, params = route_of(self.routes, scope)
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests.labels(route, method, str(status)).inc()
            if self.json_log:
                line = {"request_id": request_id, "method": method, "route": route, "status": status,
                        "ms": round((time.perf_counter() - t0) * 1000, 1)}
                if self.log_identities and "name" in params:
                    line["identity"] = params["name"]
                access_log.info(json.dumps(line, ensure_ascii=False))


class JsonFormatter(logging.Formatter):
    """--log-format json: each log record as one JSON object (an access line's fields merged in)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name}
        message = record.getMessage()
        try:  # an access line's fields at the top level (RequestRecorder writes them as a JSON object)
            fields = json.loads(message) if record.name == access_log.name else None
        except ValueError:
            fields = None
        line.update(fields if isinstance(fields, dict) else {"message": message})
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def start_metrics_server(metrics: ServiceMetrics, port: int):
    """--metrics-port: /metrics without a token on 127.0.0.1:port only (prometheus_client's own server, in a
    thread); returns (server, thread) for shutdown."""
    try:
        return start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    except OSError as err:
        raise InputError(f"--metrics-port {port}: cannot listen on 127.0.0.1:{port} ({err.strerror or err}); "
                         "choose a free port") from None
