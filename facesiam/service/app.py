"""The face-verification and search service: a FastAPI app over a trained model and a gallery database.

    POST /verify     image1, image2 | JSON {embedding1, embedding2}     -> similarity and decision        (read)
    POST /search     image [, k]    | JSON {embedding, k}               -> top-k identities or "unknown" (read)
    POST /recognize  image [, k]                                        -> every face: box + identities  (read)
    POST /detect     image                                              -> every face: box, landmarks,
                                                                           detector score, quality       (read)
    GET  /identities                         -> names and face counts                                 (read)
    GET  /identities/{name}/faces            -> that identity's faces with their ids                  (read)
    POST /enroll     identity, images (1..n) | JSON {identity, embeddings} -> faces added             (write)
    PATCH /identities/{name}  JSON {name}    -> renamed                                               (write)
    DELETE /identities/{name}, /faces/{id}   -> removed                                               (write)
    GET  /status                             -> model, gallery, index, database, batching             (admin)
    GET  /metrics                            -> Prometheus text format (service/metrics.py); also
                                                without a token on 127.0.0.1:--metrics-port               (admin)
    GET  /healthz, GET /                     -> "ok" while the process lives; the web page              (public)
    GET  /readyz                             -> 200 when the model, the index and the database are ready,
                                                503 otherwise (the database away: writes answer 503 too;
                                                draining after SIGTERM: all but these two; lifecycle.py) (public)

Faces are biometric data, so: every route declares the scope a token needs (service/tokens.py: read, write,
admin) and a route without one is refused, not public (fail closed); ``public_read`` opens the read scope without a
token, rate-limited per client. Uploads are limited in bytes, parts, pixels and aspect ratio (413, checked before
decoding); they stay in memory and nothing is written or logged unless ``keep_images`` names a folder. Bad input is
a JSON error with 400/401/403/404/408/409/413/415/429 (503: the database is away), never a 500.
service/hardening.py guards the HTTP level; service/store.py keeps the gallery (a database + an index in memory); service/routes.py has the endpoints.
"""

from __future__ import annotations

import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser
from starlette.routing import Match

from ..errors import ConflictError, InputError
from .context import Service, ServiceError, ServiceSettings
from .database import DatabaseUnavailable
from .hardening import BODY_LIMIT, SECURITY_HEADERS, RequestGuard
from .lifecycle import DrainGate
from .metrics import RequestRecorder
from .routes import gallery_routes, info_routes, probe_routes
from .store import GalleryStore, open_store

log = logging.getLogger("facesiam.serve")


def create_app(embedder, settings: ServiceSettings, store: Optional[GalleryStore] = None):
    """The FastAPI app. ``embedder``: a facesiam.embedder.FaceEmbedder (TorchEmbedder or OnnxEmbedder);
    ``store``: the gallery (service/store.py: open_store; default: in memory)."""
    store = store if store is not None else open_store(None, None, embedder.embedding_dim, model=settings.model_name)
    service = Service(embedder, settings, store)
    # Uploads stay in memory (Starlette spools files over 1 MB to a temporary file on disk otherwise): no face
    # image touches the disk unless keep_images asks for it. No file can be larger than the largest body, which the
    # byte limits below bound; a file of over --max-upload-mb is refused after reading, from memory.
    MultiPartParser.spool_max_size = service.max_request + 1
    app = FastAPI(title="facesiam", version="2", lifespan=service.lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # no public schema pages: the service is not a public API by default
    # RequestGuard goes in first, so it sits inside the token guard, right around the app: its receive() errors
    # (413, 408) reach the app's handlers directly, not through BaseHTTPMiddleware's task group
    app.add_middleware(RequestGuard, allowed_hosts=settings.allowed_hosts, max_body=service.max_request,
                       body_timeout=settings.body_timeout, idle_timeout=settings.idle_timeout)
    routers = (info_routes(service), probe_routes(service), gallery_routes(service))
    routes = [route for router in routers for route in router.routes]
    _install_guard(app, service, routes)
    for router in routers:
        app.include_router(router)
    # around the guards: after SIGTERM every new request but the probes is answered 503 before anything else
    app.add_middleware(DrainGate, drain=service.drain)
    # outermost: it counts (and, with --log-format json, logs) every answer, the guards' refusals included
    app.add_middleware(RequestRecorder, metrics=service.metrics, routes=routes,
                       json_log=settings.json_access_log, log_identities=settings.log_identities)
    app.state.service, app.state.routes = service, routes
    return app


def route_scope(routes: list, scope: dict) -> tuple[bool, Optional[str], int]:
    """(whether one of ``routes`` serves this request, the scope it declares: None when it declares none, the
    images it takes)."""
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            endpoint = getattr(route, "endpoint", None)
            return True, getattr(endpoint, "scope", None), getattr(endpoint, "uploads", 0)
    return False, None, 0


def _install_guard(app: FastAPI, service: Service, routes: list) -> None:
    """The token's scope and the declared size before the body is read; every error as JSON."""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        # an unauthorised or oversized upload is refused without being received
        found, needs, uploads = route_scope(routes, request.scope)
        if not found:  # a route added to the app some other way declares no scope either: refused below
            found = any(route.matches(request.scope)[0] == Match.FULL for route in app.router.routes)
        if found:
            try:
                if needs is None:  # fail closed: a route that forgot its scope is refused, never public
                    raise ServiceError(403, f"{request.url.path} declares no access scope; refused")
                service.authorize(request, needs)
            except ServiceError as err:
                if needs is not None:
                    service.metrics.refused(needs, err.status)
                return _error(err.status, err.message, err.headers)
        length = request.headers.get("content-length")
        if request.method in ("POST", "PATCH") and not (length or "").isdigit():
            # a chunked body has no declared size to check: uploads are held in memory, so it is refused
            return _error(411, "send the request with a Content-Length header (uploads are size-checked first)")
        limit = service.body_limit(uploads)  # this endpoint's: /search takes one image, /enroll up to --max-files
        request.scope[BODY_LIMIT] = limit  # RequestGuard counts the bytes received against it
        if length is not None and length.isdigit() and int(length) > limit:
            return _error(413, f"request of {int(length):,} bytes is over the limit of {limit:,} for "
                               f"{request.url.path}")
        return await call_next(request)

    @app.exception_handler(ServiceError)
    async def service_error(request, err: ServiceError):
        return _error(err.status, err.message, err.headers)

    @app.exception_handler(InputError)
    async def input_error(request, err: InputError):
        return _error(409 if isinstance(err, ConflictError) else 400, str(err))

    @app.exception_handler(DatabaseUnavailable)
    async def database_unavailable(request, err: DatabaseUnavailable):  # PostgreSQL restarting: retry, not a bug
        return _error(503, str(err), {"Retry-After": "2"})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
                             for e in err.errors())
        return _error(400, f"bad request: {problems}")

    @app.exception_handler(Exception)
    async def unexpected(request, err: Exception):  # a bug: logged with its traceback, answered as JSON like the rest
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(err).__name__}); the service log has the details")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        return _error(err.status_code, str(err.detail))


def _error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    # the security headers here too: the guard's own answers (401, 403, 411, 413, 429) go out past RequestGuard
    return JSONResponse({"error": message, "status": status}, status_code=status,
                        headers={**SECURITY_HEADERS, "cache-control": "no-store", **(headers or {})})


def check_settings(settings: ServiceSettings) -> None:
    if settings.max_batch < 1 or settings.batch_wait_ms < 0:
        raise InputError("--max-batch must be >= 1 and --batch-wait-ms >= 0")
    if settings.public_rate <= 0 or settings.public_burst < 1:
        raise InputError("--public-rate must be > 0 and --public-burst >= 1")
    if settings.max_faces < 1 or settings.public_cost_rate <= 0:
        raise InputError("--max-faces must be >= 1 and --public-cost-rate > 0")
