"""The face-verification and search service: a FastAPI app over a trained model and a persistent gallery.

    POST /verify   image1, image2             -> similarity, decision, threshold and where it came from
    POST /search   image [, k]                -> top-k identities, open-set answer ("unknown" below the threshold)
    POST /enroll   identity, images (1..n)    -> added to the gallery, saved atomically
    DELETE /identities/{name}                 -> that identity's entries removed, saved atomically
    GET /identities                           -> enrolled names and image counts
    GET /healthz                              -> liveness, model, gallery size, batching statistics (no token)
    GET /                                     -> the web page (static; its calls carry the token)

Faces are biometric data, so: every endpoint but /healthz and the page needs ``Authorization: Bearer TOKEN``
(``public_read`` opens verify, search and the identity list; enrol and delete always need it); uploads are limited
in bytes (413) and pixels (413, checked from the header before decoding); uploads stay in memory and nothing is
written or logged unless ``keep_images`` names a folder. Bad input is a JSON error with 400/401/403/404/413/415,
never a 500. service/hardening.py guards the HTTP level: the Host allow-list, smuggling headers, the body limit on
the bytes received, security headers, and identity names (NFC, no hidden characters).
"""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
from fastapi import APIRouter, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartParser

from ..data.images import BadImage, TooManyPixels, rgb_from_bytes
from ..errors import InputError
from .batcher import Batcher, NoFace, embed_many_for
from .hardening import LOOPBACK_HOSTS, BadName, RequestGuard, normalize_identity
from .store import GalleryStore

log = logging.getLogger("facesiam.serve")

PAGE = Path(__file__).with_name("page.html")
# What a browser or client may send as an image's content type; application/octet-stream is what curl and many
# HTTP libraries send for a file without a known extension, so the bytes decide there.
IMAGE_TYPES = ("image/", "application/octet-stream")


@dataclass
class ServiceSettings:
    """How the service decides, limits and protects (facesiam serve's flags)."""

    token: str
    """Bearer token every protected endpoint requires."""
    threshold: float
    """Cosine similarity at or above which two faces are the same person (and a search hit is known)."""
    threshold_source: str
    """Where the threshold came from, returned with every decision."""
    public_read: bool = False
    """verify, search and the identity list without a token (enrol and delete still need it)."""
    max_bytes: int = 10 * 1024 * 1024
    """Largest accepted upload per image (413 above)."""
    max_pixels: int = 40_000_000
    """Largest accepted image in pixels, from its header before decoding (413 above: decompression bombs)."""
    max_files: int = 32
    """Most images in one enrol request."""
    max_aspect: float = 10.0
    """Longest side over shortest above which an image is refused (413) from its header."""
    max_side: int = 2048
    """Longer side to which larger photos are shrunk after decoding, before detection: the detector's time and memory
    grow with the pixels (a 6300 x 6300 photo: 12 s and 1.9 GB of the model thread), the 112 px crop does not."""
    body_timeout: float = 60.0
    """Seconds a request body may take to arrive in all (408 after)."""
    idle_timeout: float = 10.0
    """Seconds a request body may stall between two pieces (408 after: a client that announced more than it sends)."""
    top_k: int = 5
    """Identities a search returns unless the request asks for k."""
    keep_images: Optional[Path] = None
    """Folder to keep every uploaded image in (None: nothing is written)."""
    align: bool = True
    """Detect and align faces as the model was trained (False: uploads are aligned crops already)."""
    max_batch: int = 32
    """Most images in one network pass (1: no batching)."""
    batch_wait_ms: float = 5.0
    """How long the first image of a batch waits for others."""
    model_name: str = ""
    """What the model is, for /healthz and the logs."""
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    """Host header values served (others: 400): a web page elsewhere cannot reach the service by DNS rebinding."""


class ServiceError(Exception):
    """An error answered as JSON ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class Service:
    """What the endpoints share: settings, the gallery store, the batcher (the model thread) and the helpers that
    check access and read uploads."""

    def __init__(self, embedder, settings: ServiceSettings, gallery_dir: Optional[str | Path] = None):
        self.settings, self.gallery_dir = settings, gallery_dir
        self.store = GalleryStore(gallery_dir, embedder.embedding_dim, model=settings.model_name)
        self.batcher = Batcher(embed_many_for(embedder, align=settings.align), max_batch=settings.max_batch,
                               max_wait_ms=settings.batch_wait_ms)
        self.max_request = settings.max_bytes * max(2, settings.max_files) + 64 * 1024

    @asynccontextmanager
    async def lifespan(self, app):
        s = self.settings
        await self.batcher.start()
        log.info("serving %s; gallery %s (%d entries, %d identities); threshold %.4f (%s); batching %s",
                 s.model_name, self.gallery_dir or "(none: in memory only)", self.store.size,
                 len(self.store.identities()), s.threshold, s.threshold_source,
                 f"up to {s.max_batch} images within {s.batch_wait_ms} ms" if s.max_batch > 1 else "off")
        yield
        await self.batcher.stop()

    @staticmethod
    def access(method: str, path: str) -> Optional[str]:
        """What an endpoint needs: "read" (open with public_read), "write" (always the token), None (public)."""
        if path in ("/verify", "/search") or (path == "/identities" and method == "GET"):
            return "read"
        if path == "/enroll" or path.startswith("/identities/"):
            return "write"
        return None

    def authorize(self, request: Request, *, read: bool) -> None:
        if read and self.settings.public_read:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ServiceError(401, "a bearer token is required: send 'Authorization: Bearer TOKEN'",
                               {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), self.settings.token.encode()):
            raise ServiceError(403, "the token is not valid for this service")

    async def read_image(self, upload: UploadFile, field: str) -> Image.Image:
        s = self.settings
        name = upload.filename or field
        kind = (upload.content_type or "application/octet-stream").lower()
        if not kind.startswith(IMAGE_TYPES):
            raise ServiceError(415, f"{field} ({name}): content type {kind} is not an image; send a JPEG, PNG, ...")
        raw = await upload.read(s.max_bytes + 1)
        if len(raw) > s.max_bytes:
            raise ServiceError(413, f"{field} ({name}): over the limit of {s.max_bytes:,} bytes")
        try:  # decoded in a worker thread: a large photo must not stall the event loop (/healthz, other requests)
            image = await run_in_threadpool(decode_upload, raw, f"{field} ({name})", s)
        except TooManyPixels as err:
            raise ServiceError(413, str(err)) from None
        except BadImage as err:
            raise ServiceError(400, str(err)) from None
        if s.keep_images is not None:
            _keep(s.keep_images, field, image)
        return image

    async def embed(self, images: list[Image.Image], names: list[str]) -> np.ndarray:
        results = await self.batcher.embed(images)
        for name, result in zip(names, results):
            if isinstance(result, NoFace):
                raise ServiceError(400, f"{name}: {result}")
        return np.stack(results)


def create_app(embedder, settings: ServiceSettings, gallery_dir: Optional[str | Path] = None):
    """The FastAPI app. ``embedder``: a facesiam.embedder.FaceEmbedder (TorchEmbedder or OnnxEmbedder)."""
    # Uploads stay in memory (Starlette spools files over 1 MB to a temporary file on disk otherwise): no face
    # image touches the disk unless keep_images asks for it. The byte limit below bounds the memory.
    MultiPartParser.spool_max_size = settings.max_bytes + 1
    service = Service(embedder, settings, gallery_dir)
    app = FastAPI(title="facesiam", version="1", lifespan=service.lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # no public schema pages: the service is not a public API by default
    # RequestGuard goes in first, so it sits inside the token guard, right around the app: its receive() errors
    # (413, 408) reach the app's handlers directly, not through BaseHTTPMiddleware's task group
    app.add_middleware(RequestGuard, allowed_hosts=settings.allowed_hosts, max_body=service.max_request,
                       body_timeout=settings.body_timeout, idle_timeout=settings.idle_timeout)
    _install_guard(app, service)
    app.include_router(_routes(service))
    app.state.store, app.state.batcher, app.state.settings = service.store, service.batcher, settings
    return app


def _install_guard(app: FastAPI, service: Service) -> None:
    """Token and declared size before the body is read; every error as JSON."""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        # an unauthorised or oversized upload is refused without being received
        needs = service.access(request.method, request.url.path)
        if needs is not None:
            try:
                service.authorize(request, read=needs == "read")
            except ServiceError as err:
                return _error(err.status, err.message, err.headers)
        length = request.headers.get("content-length")
        if request.method == "POST" and not (length or "").isdigit():
            # a chunked body has no declared size to check: uploads are held in memory, so it is refused
            return _error(411, "send the request with a Content-Length header (uploads are size-checked first)")
        if length is not None and length.isdigit() and int(length) > service.max_request:
            return _error(413, f"request of {int(length):,} bytes is over the limit of {service.max_request:,}")
        return await call_next(request)

    @app.exception_handler(ServiceError)
    async def service_error(request, err: ServiceError):
        return _error(err.status, err.message, err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
                             for e in err.errors())
        return _error(400, f"bad request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        return _error(err.status_code, str(err.detail))


def _routes(service: Service) -> APIRouter:
    """The endpoints (see the module docstring)."""
    router, settings, store, batcher = APIRouter(), service.settings, service.store, service.batcher

    def now_ms(t0: float) -> float:
        return round((time.perf_counter() - t0) * 1000, 1)

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @router.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": settings.model_name, "gallery_size": store.size,
                "identities": len(store.identities()), "batching": batcher.stats.as_dict()}

    @router.post("/verify")
    async def verify(image1: UploadFile = File(...), image2: UploadFile = File(...)):
        t0 = time.perf_counter()
        images = [await service.read_image(image1, "image1"), await service.read_image(image2, "image2")]
        emb = await service.embed(images, [f"image1 ({image1.filename})", f"image2 ({image2.filename})"])
        similarity = float(np.dot(emb[0], emb[1]))
        same = similarity >= settings.threshold
        log.info("verify: similarity %.4f -> %s (%.0f ms)", similarity, "same" if same else "different", now_ms(t0))
        return {"similarity": similarity, "same": bool(same), "decision": "same" if same else "different",
                "threshold": settings.threshold, "threshold_source": settings.threshold_source, "ms": now_ms(t0)}

    @router.post("/search")
    async def search(image: UploadFile = File(...), k: Optional[int] = Form(None)):
        t0 = time.perf_counter()
        k = settings.top_k if k is None else k
        if not 1 <= k <= 100:
            raise ServiceError(400, f"k must be between 1 and 100, got {k}")
        emb = await service.embed([await service.read_image(image, "image")], [f"image ({image.filename})"])
        matches = [{"identity": m["identity"], "score": m["score"]} for m in store.search(emb, k)[0]]
        known = bool(matches) and matches[0]["score"] >= settings.threshold
        log.info("search: %d matches, %s (%.0f ms)", len(matches), "known" if known else "unknown", now_ms(t0))
        return {"identity": matches[0]["identity"] if known else "unknown", "known": known,
                "score": matches[0]["score"] if matches else None, "matches": matches,
                "threshold": settings.threshold, "threshold_source": settings.threshold_source, "ms": now_ms(t0)}

    @router.post("/enroll")
    async def enroll(identity: str = Form(...), images: list[UploadFile] = File(...)):
        t0 = time.perf_counter()
        identity = checked_name(identity)
        if len(images) > settings.max_files:
            raise ServiceError(413, f"{len(images)} images in one enrol; at most {settings.max_files}")
        pictures = [await service.read_image(f, "images") for f in images]
        emb = await service.embed(pictures, [f"images ({f.filename})" for f in images])  # all or nothing
        total = await batcher.run_in_model_thread(store.enroll, identity, emb, [f.filename or "" for f in images])
        log.info("enrolled %d image(s) of one identity (%.0f ms)", len(pictures), now_ms(t0))
        return {"identity": identity, "added": len(pictures), "images": total, "gallery_size": store.size,
                "ms": now_ms(t0)}

    @router.delete("/identities/{name}")
    async def delete_identity(name: str):
        name = checked_name(name)
        removed = await batcher.run_in_model_thread(store.delete, name)
        if not removed:
            raise ServiceError(404, f"identity {name!r} is not enrolled")
        return {"identity": name, "removed": removed, "gallery_size": store.size}

    @router.get("/identities")
    async def identities():
        names = store.identities()
        return {"count": len(names), "identities": [{"name": n, "images": c} for n, c in names.items()]}

    return router


def decode_upload(raw: bytes, name: str, settings: ServiceSettings) -> Image.Image:
    """An upload as RGB within the budgets: pixels and aspect ratio from the header, then shrunk to max_side."""
    image = rgb_from_bytes(raw, name, max_pixels=settings.max_pixels, max_aspect=settings.max_aspect)
    if max(image.size) > settings.max_side:
        image.thumbnail((settings.max_side, settings.max_side), Image.BILINEAR, reducing_gap=2.0)
    return image


def checked_name(name: str) -> str:
    """The identity name as stored (NFC, stripped), or a 400 saying what is wrong with it."""
    try:
        return normalize_identity(name)
    except BadName as err:
        raise ServiceError(400, str(err)) from None


def _error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _keep(folder: Path, field: str, image: Image.Image) -> None:
    """--keep-images: the upload as a PNG named by time and field (never by the client's file name)."""
    from ..fileio import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    with atomic_write(folder / f"{stamp}-{field}.png", "wb") as f:
        image.save(f, "PNG")


def check_settings(settings: ServiceSettings) -> None:
    if not settings.token or len(settings.token) < 16:
        raise InputError("the service token must be at least 16 characters; generate one with "
                         "`python -c \"import secrets; print(secrets.token_urlsafe(32))\"`")
    if settings.max_batch < 1 or settings.batch_wait_ms < 0:
        raise InputError("--max-batch must be >= 1 and --batch-wait-ms >= 0")
