"""Micro-batching: requests that arrive together share one detector pass and one network pass.

Each request puts its decoded images on an asyncio queue and awaits a future per image. One worker task takes the
first waiting image, then keeps collecting until ``max_batch`` images or ``max_wait_ms`` have passed, and runs the
batch in a single worker thread (the model never runs on the event loop, and one thread keeps torch/onnxruntime
from competing with themselves for the cores). ``max_batch=1`` turns batching off: every image is its own pass.
When the service drains (service/lifecycle.py) ``hurry`` ends the waiting for company, and ``stop`` runs every image
queued before it, then stops: a request in flight at SIGTERM gets its answer.

Hand-written because the libraries for this (e.g. Ray Serve's @serve.batch, NVIDIA Triton's dynamic batcher) are
whole serving systems; this is the 60 lines a FastAPI app needs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

log = logging.getLogger("facesiam.serve")
_HURRY, _STOP = object(), object()  # the worker's queue messages besides images: stop waiting for company; stop


class NoFace(ValueError):
    """The image has no face the model can use (the reason is the message)."""


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    largest: int = 0

    def as_dict(self) -> dict:
        return {"batches": self.batches, "images": self.images, "largest_batch": self.largest,
                "mean_batch": round(self.images / self.batches, 2) if self.batches else 0.0}


class Batcher:
    """``await batcher.embed([img, ...])`` -> one unit embedding or a NoFace per image, batched across callers.

    ``clock``: monotonic seconds that decide when a batch's wait is over (tests pass a fake one).
    """

    def __init__(self, embed_many: Callable[[Sequence[Image.Image]], list], *, max_batch: int = 32,
                 max_wait_ms: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.embed_many = embed_many
        self.clock = clock
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.stats = BatchStats()
        self.on_batch: Optional[Callable[[int], None]] = None  # told each batch's size (service/metrics.py)
        self._queue: Optional[asyncio.Queue] = None
        self._worker: Optional[asyncio.Task] = None
        self._collecting: list = []  # the batch the worker is gathering (taken off the queue, not yet running)
        self._closed = False
        self._signals = 0  # _HURRY and _STOP messages in the queue (not images)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="facesiam-model")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run())

    @property
    def running(self) -> bool:
        """Whether batches are being served (started, not stopped or crashed): part of /readyz."""
        return self._worker is not None and not self._worker.done()

    @property
    def queued(self) -> int:
        """Images waiting for the model thread, those of a batch still gathering included (the queue depth
        /metrics reports)."""
        waiting = self._queue.qsize() - self._signals if self._queue is not None else 0
        return waiting + len(self._collecting)

    def hurry(self) -> None:
        """No more waiting for company: from now on a batch is what is waiting when it starts (the service is
        draining: a batch held back for images that will not come would keep its requests for --batch-wait-ms)."""
        self.max_wait = 0.0
        if self._queue is not None:
            self._signal(_HURRY)  # wakes the worker if it is waiting

    async def stop(self) -> None:
        """Run every image queued so far, then stop (``embed`` refuses new ones)."""
        self._closed = True
        if self.running:
            self.hurry()
            self._signal(_STOP)
            await self._worker
        self._pool.shutdown(wait=True)

    def _signal(self, message: object) -> None:
        self._signals += 1
        self._queue.put_nowait(message)

    async def run_in_model_thread(self, fn: Callable, *args):
        """Run ``fn`` on the model's thread (e.g. a gallery write), in order with the batches."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def embed(self, images: Sequence[Image.Image]) -> list:
        if self._closed:
            raise RuntimeError("the model thread has stopped (the service is shutting down)")
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            future = loop.create_future()
            self._queue.put_nowait((image, future))
            futures.append(future)
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            self._signals -= first is _HURRY or first is _STOP
            if first is _STOP:
                return
            if first is _HURRY:
                continue
            batch = self._collecting = [first]
            deadline = self.clock() + self.max_wait
            while len(batch) < self.max_batch:
                try:  # whatever is already waiting joins at once; then wait out the time budget
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - self.clock()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                self._signals -= item is _HURRY or item is _STOP
                if item is _HURRY:
                    deadline = self.clock()  # what is waiting now still joins; nothing more is waited for
                elif item is _STOP:
                    stopping = True
                    break
                else:
                    batch.append(item)
            self._collecting = []
            # a request cut at the end of a drain (its future cancelled) needs its images no more
            batch = [(image, future) for image, future in batch if not future.done()]
            if batch:
                await self._pass(loop, batch)

    async def _pass(self, loop, batch: list) -> None:
        """One network pass over ``batch`` ((image, future) pairs); each future gets its image's result."""
        images = [image for image, _ in batch]
        try:
            results = await loop.run_in_executor(self._pool, self.embed_many, images)
        except Exception as err:  # a model failure fails this batch's requests, not the service
            log.exception("batch of %d failed", len(batch))
            results = [err] * len(batch)
        self.stats.batches += 1
        self.stats.images += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        if self.on_batch is not None:
            self.on_batch(len(batch))
        for (_, future), result in zip(batch, results):
            if not future.done():
                if isinstance(result, Exception) and not isinstance(result, NoFace):  # NoFace is an answer
                    future.set_exception(result)
                else:
                    future.set_result(result)


def embed_many_for(embedder, *, align: bool = True) -> Callable[[Sequence[Image.Image]], list]:
    """The batch function for an embedder (facesiam.embedder.FaceEmbedder): detect + align as the model was
    trained (one detector pass for the batch), then one network pass over the faces that were found. Each result
    is ``(embedding, timings)`` (the batch's detect and embed milliseconds) or a NoFace."""

    def embed_many(images: Sequence[Image.Image]) -> list:
        aligner = embedder.aligner if align else None
        faces: list = list(images)
        results: list = [None] * len(images)
        t0 = time.perf_counter()
        if aligner is not None:
            faces = []
            for i, found in enumerate(aligner.align_batch(list(images))):
                if found.image is None or found.status != "aligned":
                    results[i] = NoFace(f"{found.reason or 'no face found'}; the model was trained on aligned "
                                        f"faces: send a photo in which one face of at least "
                                        f"{aligner.min_face_size} px is fully visible")
                faces.append(found.image)
        t1 = time.perf_counter()
        keep = [i for i, r in enumerate(results) if r is None]
        if keep:
            emb = np.asarray(embedder.embed_faces([faces[i] for i in keep]), np.float32)
            timings = {"detect_ms": round((t1 - t0) * 1000, 1),
                       "embed_ms": round((time.perf_counter() - t1) * 1000, 1), "batch": len(images)}
            for row, i in zip(emb, keep):
                results[i] = (row, timings)
        return results

    return embed_many
