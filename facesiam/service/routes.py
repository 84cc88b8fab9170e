"""The service's endpoints, one router per concern (see service/app.py for the list): ``info_routes`` (the page,
/healthz, /readyz, /status), ``probe_routes`` (verify, search, recognize, detect: they read the gallery), and
``gallery_routes`` (people and faces: list, enrol, rename, delete). Each endpoint declares its scope with
``@scoped``; the guard in app.py checks it before the body is read.
"""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .context import MANY, PAGE, Service, ServiceError, Timer, checked_name, scoped
from .faces import TooManyFaces, faces_in
from .lifecycle import RETRY_AFTER
from .metrics import CONTENT_TYPE_LATEST
from .tokens import PUBLIC

log = logging.getLogger("facesiam.serve")


def sent_json(request: Request) -> bool:
    """Whether the request carries JSON (embeddings) rather than a multipart form (photos)."""
    return request.headers.get("content-type", "").startswith("application/json")


def info_routes(service: Service) -> APIRouter:
    router, store, settings = APIRouter(), service.store, service.settings

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    @scoped(PUBLIC)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @router.get("/healthz")
    @scoped(PUBLIC)
    async def healthz():
        return {"status": "ok"}  # says nothing about the model or the gallery to callers without a token

    @router.get("/readyz")
    @scoped(PUBLIC)
    async def readyz():
        """For a load balancer: 200 when this process can serve every endpoint, 503 (and which part is not
        ready: model, index, database; or that it is shutting down) otherwise; /healthz only says the process lives."""
        if service.drain.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER)})
        waiting = [part for part, ready in (("model", service.batcher.running), ("index", store.index_ready),
                                            ("database", await run_in_threadpool(store.ping))) if not ready]
        if waiting:
            return JSONResponse({"status": "not ready", "waiting_for": waiting}, status_code=503,
                                headers={"Retry-After": "2"})
        return {"status": "ready"}

    @router.get("/status")
    @scoped("admin")
    async def status():
        reachable = await run_in_threadpool(store.ping)
        return {"status": "ok" if reachable else "database unreachable", "model": settings.model_name,
                "gallery_size": store.size,
                "identities": len(store.identities()), "database": store.describe_database(),
                "index": store.describe_index(), "threshold": settings.threshold,
                "threshold_source": settings.threshold_source, "batching": service.batcher.stats.as_dict(),
                "tokens": len(settings.tokens.tokens)}

    @router.get("/metrics")
    @scoped("admin")
    async def metrics():
        """Prometheus' text format (service/metrics.py); the gallery gauges are read now, off the event loop."""
        return Response(await run_in_threadpool(service.metrics.text), media_type=CONTENT_TYPE_LATEST)

    return router


def k_of(value, default: int) -> int:
    """The number of matches asked for: a whole number, or its digits in a form field (not true, 2.5 or "2.5")."""
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError(value)
        k = default if value in (None, "") else int(value)
    except (TypeError, ValueError, OverflowError):
        raise ServiceError(400, f"k must be a whole number between 1 and 100, got {value!r}") from None
    if not 1 <= k <= 100:
        raise ServiceError(400, f"k must be between 1 and 100, got {k}")
    return k


def probe_routes(service: Service) -> APIRouter:
    router, settings = APIRouter(), service.settings

    def decision(similarity: float) -> dict:
        same = similarity >= settings.threshold
        return {"similarity": similarity, "same": bool(same), "decision": "same" if same else "different",
                "threshold": settings.threshold, "threshold_source": settings.threshold_source}

    async def one_photo(request: Request, timer: Timer):
        form = await service.form(request, files=1, fields=1)
        upload = service.upload(form, "image")
        image, _ = await service.read_image(upload, "image", timer)
        return form, upload, image

    @router.post("/verify")
    @scoped("read", uploads=2)
    async def verify(request: Request):
        timer = service.timer()
        if sent_json(request):
            data = await service.json_body(request)
            emb = np.concatenate([service.embedding_of(data, "embedding1"), service.embedding_of(data, "embedding2")])
        else:
            form = await service.form(request, files=2, fields=0)
            uploads = [service.upload(form, "image1"), service.upload(form, "image2")]
            images = [(await service.read_image(u, f"image{i + 1}", timer))[0] for i, u in enumerate(uploads)]
            service.charge(request, sum(image.width * image.height for image in images))
            emb = await service.embed(images, [f"image{i + 1} ({u.filename})" for i, u in enumerate(uploads)], timer)
        result = decision(float(np.dot(emb[0], emb[1])))
        log.info("verify: similarity %.4f -> %s (%.0f ms)", result["similarity"], result["decision"],
                 timer.done()["total_ms"])
        return {**result, "timings": timer.done(), "ms": timer.done()["total_ms"]}

    @router.post("/search")
    @scoped("read", uploads=1)
    async def search(request: Request):
        timer = service.timer()
        if sent_json(request):
            data = await service.json_body(request)
            k, emb = k_of(data.get("k"), settings.top_k), service.embedding_of(data, "embedding")
        else:
            form, upload, image = await one_photo(request, timer)
            service.charge(request, image.width * image.height)
            k = k_of(form.get("k"), settings.top_k)
            emb = await service.embed([image], [f"image ({upload.filename})"], timer)
        matches = [{"identity": m["identity"], "score": m["score"], "face": m["face"]}
                   for m in (await service.search(emb, k, timer))[0]]
        answer = service.answer(matches)
        log.info("search: %d matches, %s (%.0f ms)", len(matches), "known" if answer["known"] else "unknown",
                 timer.done()["total_ms"])
        return {**answer, "threshold": settings.threshold, "threshold_source": settings.threshold_source,
                "timings": timer.done(), "ms": timer.done()["total_ms"]}

    async def every_face(request: Request, *, embed: bool):
        timer = service.timer()
        form, _, image = await one_photo(request, timer)
        if service.embedder.aligner is None or not settings.align:
            raise ServiceError(400, "this service runs without a face detector (the model was trained on crops, or "
                                    "--no-align): send one aligned face to /search instead")
        try:
            faces, emb, times = await service.batcher.run_in_model_thread(
                partial(faces_in, embed=embed, max_faces=settings.max_faces), service.embedder, image)
        except TooManyFaces as err:
            service.charge(request, image.width * image.height, err.found)  # the detector ran over them all
            raise ServiceError(413, str(err)) from None
        service.charge(request, image.width * image.height, len(faces))
        for name, ms in times.items():
            timer.add(name, ms)
        return form, image, faces, emb, timer

    @router.post("/detect")
    @scoped("read", uploads=1)
    async def detect(request: Request):
        _, image, faces, _, timer = await every_face(request, embed=False)
        log.info("detect: %d face(s) (%.0f ms)", len(faces), timer.done()["total_ms"])
        return {"faces": faces, "count": len(faces), "width": image.width, "height": image.height,
                "quality": "sharpness: variance of the Laplacian of the aligned crop (below ~25: blurred); size_px: "
                           "the face box's longer side; score: the detector's confidence",
                "timings": timer.done()}

    @router.post("/recognize")
    @scoped("read", uploads=1)
    async def recognize(request: Request):
        form, image, faces, emb, timer = await every_face(request, embed=True)
        k = k_of(form.get("k"), min(settings.top_k, 3))
        found = await service.search(emb, k, timer) if len(emb) else []
        usable = iter(found)
        for face in faces:
            if face["usable"]:  # "score" stays the detector's; the best match's is "similarity"
                answer = service.answer([{"identity": m["identity"], "score": m["score"]} for m in next(usable)])
                face.update(identity=answer["identity"], known=answer["known"], similarity=answer["score"],
                            matches=answer["matches"])
        known = sum(1 for f in faces if f.get("known"))
        log.info("recognize: %d face(s), %d known (%.0f ms)", len(faces), known, timer.done()["total_ms"])
        return {"faces": faces, "count": len(faces), "known": known, "width": image.width, "height": image.height,
                "threshold": settings.threshold, "threshold_source": settings.threshold_source,
                "timings": timer.done()}

    return router


def gallery_routes(service: Service) -> APIRouter:
    router, settings, store = APIRouter(), service.settings, service.store

    @router.post("/enroll")
    @scoped("write", uploads=MANY)
    async def enroll(request: Request):
        timer = service.timer()
        if sent_json(request):
            data = await service.json_body(request)
            identity = checked_name(data.get("identity"))
            emb = service.embedding_of(data, "embeddings", many=True)
            sources = ["embedding"] * len(emb)
        else:
            form = await service.form(request, files=settings.max_files, fields=1)
            identity = checked_name(form.get("identity"))
            uploads = form.getlist("images")
            if not uploads or isinstance(uploads[0], str):
                raise ServiceError(400, "bad request: images: at least one image file is required")
            pictures = [await service.read_image(f, "images", timer) for f in uploads]
            emb = await service.embed([p for p, _ in pictures], [f"images ({f.filename})" for f in uploads],
                                      timer)  # all or nothing
            sources = [source for _, source in pictures]
        ids, total = await run_in_threadpool(store.enroll, identity, emb, sources)
        log.info("enrolled %d face(s) of one identity (%.0f ms)", len(ids), timer.done()["total_ms"])
        return {"identity": identity, "added": len(ids), "faces": ids, "images": total, "gallery_size": store.size,
                "timings": timer.done(), "ms": timer.done()["total_ms"]}

    @router.get("/identities")
    @scoped("read")
    async def identities():
        names = store.identities()
        return {"count": len(names), "identities": [{"name": n, "images": c} for n, c in names.items()]}

    @router.get("/identities/{name}/faces")
    @scoped("read")
    async def faces(name: str):
        name = checked_name(name)
        found = await run_in_threadpool(store.faces_of, name)
        if found is None:
            raise ServiceError(404, f"identity {name!r} is not enrolled")
        return {"identity": name, "count": len(found), "faces": found}

    @router.patch("/identities/{name}")
    @scoped("write")
    async def rename(name: str, request: Request):
        name, new = checked_name(name), checked_name((await service.json_body(request)).get("name"), "name")
        if not await run_in_threadpool(store.rename, name, new):
            raise ServiceError(404, f"identity {name!r} is not enrolled")
        return {"identity": new, "renamed_from": name, "images": store.count(new)}

    @router.delete("/identities/{name}")
    @scoped("write")
    async def delete_identity(name: str):
        name = checked_name(name)
        removed = await run_in_threadpool(store.delete, name)
        if not removed:
            raise ServiceError(404, f"identity {name!r} is not enrolled")
        return {"identity": name, "removed": removed, "gallery_size": store.size}

    @router.delete("/faces/{face_id}")
    @scoped("write")
    async def delete_face(face_id: int):
        # ids are 64-bit: a larger number names no face (and would not fit SQLite's INTEGER)
        identity = await run_in_threadpool(store.delete_face, face_id) if 0 < face_id < 2 ** 63 else None
        if identity is None:
            raise ServiceError(404, f"face {face_id} is not in the gallery")
        return {"face": face_id, "identity": identity, "images": store.count(identity), "gallery_size": store.size}

    return router
