"""What the service's endpoints share: its settings, the Service object (store, batcher, tokens, upload reading,
timings), the ``scoped`` marker every endpoint carries, and the upload and name checks. service/app.py assembles
the app; service/routes.py has the endpoints.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from fastapi import Request
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.images import BadImage, TooManyPixels, rgb_from_bytes
from .batcher import Batcher, NoFace, embed_many_for
from .hardening import LOOPBACK_HOSTS, BadName, RateLimiter, normalize_identity
from .lifecycle import Drain
from .metrics import ServiceMetrics, start_metrics_server
from .store import GalleryStore
from .tokens import PUBLIC, SCOPES, TokenSet

log = logging.getLogger("facesiam.serve")

PAGE = Path(__file__).with_name("page.html")
# What a browser or client may send as an image's content type; application/octet-stream is what curl and many
# HTTP libraries send for a file without a known extension, so the bytes decide there.
IMAGE_TYPES = ("image/", "application/octet-stream")
MANY = -1  # an endpoint's uploads: up to --max-files images
FIELDS_BYTES = 64 * 1024  # a request's bytes besides its images: form fields, or a JSON body of embeddings


@dataclass
class ServiceSettings:
    """How the service decides, limits and protects (facesiam serve's flags)."""

    tokens: TokenSet
    """Bearer tokens and their scopes (service/tokens.py); re-read from their file on SIGHUP."""
    threshold: float
    """Cosine similarity at or above which two faces are the same person (and a search hit is known)."""
    threshold_source: str
    """Where the threshold came from, returned with every decision."""
    public_read: bool = False
    """The read scope (verify, search, recognize, detect, lists) without a token, rate-limited per client."""
    public_rate: float = 5.0
    """Requests a second one client may make without a token (on average; 429 with Retry-After above)."""
    public_burst: float = 20.0
    """Requests one client may make at once without a token before the rate applies."""
    max_bytes: int = 10 * 1024 * 1024
    """Largest accepted upload per image (413 above)."""
    max_pixels: int = 40_000_000
    """Largest accepted image in pixels, from its header before decoding (413 above: decompression bombs)."""
    max_files: int = 32
    """Most images in one enrol request (verify takes 2, search, recognize and detect 1)."""
    max_faces: int = 20
    """Most faces /recognize and /detect align and embed in one photo (413 above, checked after detection)."""
    public_cost_rate: float = 20.0
    """Work one client may ask for without a token, in megapixels x faces a second (a 2048 x 2048 photo of 20 faces
    is 84), with bursts of ten seconds' worth; 429 with Retry-After above."""
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
    """Folder to keep every uploaded image in (None: nothing is written, and no client file name is stored)."""
    align: bool = True
    """Detect and align faces as the model was trained (False: uploads are aligned crops already)."""
    max_batch: int = 32
    """Most images in one network pass (1: no batching)."""
    batch_wait_ms: float = 5.0
    """How long the first image of a batch waits for others."""
    model_name: str = ""
    """What the model is, for /status, the logs and each face's record in the database."""
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    """Host header values served (others: 400): a web page elsewhere cannot reach the service by DNS rebinding."""
    metrics_port: Optional[int] = None
    """Also serve /metrics without a token on 127.0.0.1 at this port (None: only GET /metrics, admin scope)."""
    json_access_log: bool = False
    """Write one JSON access-log line per request (request id, method, route template, status, ms)."""
    log_identities: bool = False
    """Name the identity (the route's {name}) in JSON access-log lines; off: names are biometric records' keys."""
    grace: float = 20.0
    """Seconds after SIGTERM or SIGINT that requests in flight may take to finish (new ones get 503 meanwhile);
    those still running then are cut (service/lifecycle.py)."""
    drain_delay: float = 0.0
    """Seconds after SIGTERM or SIGINT during which /readyz answers 503 but requests are still served, before the
    drain (for a load balancer to notice; a preStop sleep)."""


class ServiceError(Exception):
    """An error answered as JSON ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class Timer:
    """Per-request timings in milliseconds, returned as ``timings`` (decode, detect, embed, search, total); each
    step also goes to ``sink`` (the /metrics stage histograms: Service.timer)."""

    def __init__(self, sink: Optional[Callable[[str, float], None]] = None):
        self.t0, self.parts, self.sink = time.perf_counter(), {}, sink

    def add(self, name: str, ms: float) -> None:
        self.parts[name] = round(self.parts.get(name, 0.0) + ms, 1)
        if self.sink is not None:
            self.sink(name, ms)

    def timed(self, name: str, t: float) -> None:
        self.add(name, (time.perf_counter() - t) * 1000)

    def done(self) -> dict:
        return {**self.parts, "total_ms": round((time.perf_counter() - self.t0) * 1000, 1)}


class Service:
    """What the endpoints share: settings, the gallery store, the batcher (the model thread) and the helpers that
    check access and read uploads."""

    def __init__(self, embedder, settings: ServiceSettings, store: GalleryStore):
        self.embedder, self.settings, self.store = embedder, settings, store
        self.batcher = Batcher(embed_many_for(embedder, align=settings.align), max_batch=settings.max_batch,
                               max_wait_ms=settings.batch_wait_ms)
        self.max_request = self.body_limit(MANY)  # the largest any endpoint takes
        self.limiter = RateLimiter(settings.public_rate, settings.public_burst)
        self.cost = RateLimiter(settings.public_cost_rate, settings.public_cost_rate * 10)  # megapixel-faces
        self.drain = Drain(settings.grace, delay=settings.drain_delay)  # SIGTERM: service/lifecycle.py
        self.metrics = ServiceMetrics(store, self.batcher, self.drain)

    def timer(self) -> Timer:
        """A request's Timer, whose steps also go to the /metrics stage histograms."""
        return Timer(self.metrics.stage)

    @asynccontextmanager
    async def lifespan(self, app):
        s = self.settings
        await self.batcher.start()
        self.store.follow()
        metrics_server = None
        if s.metrics_port is not None:
            metrics_server, _ = start_metrics_server(self.metrics, s.metrics_port)
            log.info("metrics without a token on http://127.0.0.1:%d/metrics", s.metrics_port)
        loop = asyncio.get_running_loop()
        try:  # rotate tokens without a restart: edit the token file, then `kill -HUP PID`
            loop.add_signal_handler(signal.SIGHUP, s.tokens.reload)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests), or no SIGHUP
            pass
        log.info("serving %s; gallery %s (%d faces, %d identities; index %s); threshold %.4f (%s); batching %s",
                 s.model_name, self.store.describe_database(), self.store.size, len(self.store.identities()),
                 self.store.describe_index(), s.threshold, s.threshold_source,
                 f"up to {s.max_batch} images within {s.batch_wait_ms} ms" if s.max_batch > 1 else "off")
        try:
            yield
        finally:
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            await self.batcher.stop()  # runs what is queued (requests in flight until the end of a drain)
            self.store.close()  # the listener thread stopped, the database closed (SQLite: its WAL checkpointed)
            log.info("gallery %s closed", self.store.describe_database())

    def authorize(self, request: Request, scope: str) -> None:
        """Raise 401/403/429 unless the request may use ``scope`` (PUBLIC: anyone)."""
        if scope == PUBLIC:
            return
        header = request.headers.get("authorization", "")
        if not header and scope == "read" and self.settings.public_read:
            client = request.client.host if request.client else "?"
            # the cost budget is checked first (it takes nothing until the work is known: see charge)
            wait = self.cost.allow(client, 0) or self.limiter.allow(client)
            if wait:
                raise ServiceError(429, "too many requests without a token; slow down or send a token",
                                   {"Retry-After": str(max(1, round(wait)))})
            request.state.public_client = client
            return
        kind, _, given = header.partition(" ")
        if kind.lower() != "bearer" or not given.strip():
            raise ServiceError(401, "a bearer token is required: send 'Authorization: Bearer TOKEN'",
                               {"WWW-Authenticate": "Bearer"})
        token = self.settings.tokens.find(given.strip())
        if token is None:
            raise ServiceError(403, "the token is not valid for this service")
        if not token.allows(scope):
            raise ServiceError(403, f"this token may not {scope} (its scopes: {', '.join(sorted(token.scopes))})")

    def body_limit(self, uploads: int) -> int:
        """Bytes a request to an endpoint taking ``uploads`` images (MANY: --max-files) may send: the images and
        64 KB for the form's fields or a JSON body."""
        return self.settings.max_bytes * (self.settings.max_files if uploads == MANY else uploads) + FIELDS_BYTES

    def charge(self, request: Request, pixels: int, faces: int = 1) -> None:
        """Count a request's work (pixels x faces) against its client's budget when it came without a token."""
        client = getattr(request.state, "public_client", None)
        if client is not None:
            self.cost.charge(client, pixels * max(1, faces) / 1e6)

    async def form(self, request: Request, *, files: int, fields: int) -> FormData:
        """The multipart form, with at most ``files`` files and ``fields`` other fields (413 above), in memory."""
        kind = request.headers.get("content-type", "")
        if not kind.startswith("multipart/form-data"):
            raise ServiceError(415, f"send multipart/form-data (or JSON with embeddings), not {kind or 'no type'}")
        try:
            return await request.form(max_files=files, max_fields=fields)
        except StarletteHTTPException as err:
            if "Too many" in str(err.detail):
                raise ServiceError(413, f"{err.detail} for {request.url.path}") from None
            raise

    @staticmethod
    async def json_body(request: Request) -> dict:
        try:
            data = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as err:
            raise ServiceError(400, f"the body is not valid JSON: {err}") from None
        except RecursionError:  # arrays nested thousands deep
            raise ServiceError(400, "the body is nested too deeply to be a request") from None
        if not isinstance(data, dict):
            raise ServiceError(400, "send a JSON object")
        return data

    def embedding_of(self, data: dict, key: str, *, many: bool = False) -> np.ndarray:
        """A JSON field as unit embeddings (1 x d, or n x d with ``many``); 400 naming the field when unusable."""
        value = data.get(key)
        rows = value if many else [value]
        # JSON numbers only: true, "1" or an integer past float range (10**400) are not coerced into embeddings
        if isinstance(rows, list) and all(isinstance(r, list) and all(type(v) in (int, float) for v in r)
                                          for r in rows):
            try:
                x = np.asarray(rows, np.float64)
            except (TypeError, ValueError, OverflowError):
                x = np.zeros(0)
        else:
            x = np.zeros(0)
        dim = self.store.dim
        with np.errstate(over="ignore"):
            norms = np.linalg.norm(x, axis=-1) if x.ndim == 2 else np.zeros(0)
        # a norm of 0 or past float range (1e300 in every place) would make the unit vector all zeros or NaN
        if x.ndim != 2 or x.shape[1] != dim or not len(x) or not np.isfinite(x).all() or \
                not (np.isfinite(norms) & (norms > 0)).all():
            shape = "a list of lists of" if many else "a list of"
            raise ServiceError(400, f"{key}: send {shape} {dim} finite numbers (not all 0, not so large that their "
                                    "length overflows), as the model's ONNX export makes them")
        if many and len(x) > self.settings.max_files:
            raise ServiceError(413, f"{len(x)} embeddings in one request; at most {self.settings.max_files}")
        return (x / norms[:, None]).astype(np.float32)

    def upload(self, form: FormData, field: str) -> UploadFile:
        value = form.get(field)
        if not isinstance(value, UploadFile):
            raise ServiceError(400, f"bad request: {field}: a file is required")
        return value

    async def read_image(self, upload: UploadFile, field: str, timer: Timer) -> tuple[Image.Image, str]:
        """(the upload decoded, within the budgets; what to record as its source)."""
        s, t = self.settings, time.perf_counter()
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
        source = "upload"
        if s.keep_images is not None:
            source = f"kept: {_keep(s.keep_images, field, image)}"
        timer.timed("decode_ms", t)
        return image, source

    async def embed(self, images: list[Image.Image], names: list[str], timer: Timer) -> np.ndarray:
        results = await self.batcher.embed(images)
        for name, result in zip(names, results):
            if isinstance(result, NoFace):
                raise ServiceError(400, f"{name}: {result}")
        timer.add("detect_ms", max(r[1]["detect_ms"] for r in results))
        timer.add("embed_ms", max(r[1]["embed_ms"] for r in results))
        return np.stack([r[0] for r in results])

    async def search(self, embeddings: np.ndarray, k: int, timer: Timer) -> list[list[dict]]:
        t = time.perf_counter()
        found = await run_in_threadpool(self.store.search, embeddings, k)  # off the event loop: O(N) when flat
        timer.timed("search_ms", t)
        return found

    def answer(self, matches: list[dict]) -> dict:
        """A search's open-set answer: the best identity when at or above the threshold, else "unknown"."""
        known = bool(matches) and matches[0]["score"] >= self.settings.threshold
        return {"identity": matches[0]["identity"] if known else "unknown", "known": known,
                "score": matches[0]["score"] if matches else None, "matches": matches}


def scoped(scope: str, uploads: int = 0):
    """Declare the scope an endpoint needs (tokens.SCOPES or PUBLIC; the guard refuses a route without one) and
    how many images it takes (MANY: up to --max-files), which sets its body limit (Service.body_limit)."""
    if scope not in (*SCOPES, PUBLIC):
        raise ValueError(f"unknown scope {scope!r}")

    def mark(endpoint):
        endpoint.scope, endpoint.uploads = scope, uploads
        return endpoint

    return mark


def decode_upload(raw: bytes, name: str, settings: ServiceSettings) -> Image.Image:
    """An upload as RGB within the budgets: pixels and aspect ratio from the header, then shrunk to max_side."""
    image = rgb_from_bytes(raw, name, max_pixels=settings.max_pixels, max_aspect=settings.max_aspect)
    if max(image.size) > settings.max_side:
        image.thumbnail((settings.max_side, settings.max_side), Image.BILINEAR, reducing_gap=2.0)
    return image


def checked_name(name: object, field: str = "identity") -> str:
    """The identity name as stored (NFC, stripped), or a 400 saying what is wrong with it."""
    if not isinstance(name, str):
        raise ServiceError(400, f"bad request: {field}: a name is required")
    try:
        return normalize_identity(name)
    except BadName as err:
        raise ServiceError(400, str(err)) from None


def _keep(folder: Path, field: str, image: Image.Image) -> str:
    """--keep-images: the upload as a PNG named by time and field (never by the client's file name)."""
    from ..fileio import atomic_write

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    path = folder / f"{stamp}-{field}.png"
    with atomic_write(path, "wb", file_mode=0o600) as f:  # biometric data: the owner only
        image.save(f, "PNG")
    return path.name
