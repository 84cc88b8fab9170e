"""Every face in a photo, on the model thread: detection (/detect) and detection + embedding (/recognize).

One detector pass over the photo; each face is aligned as the model was trained (faces/aligner.py:
``align_each``), and all the aligned faces share one network pass. The quality reported for a face is the
variance of the Laplacian of its aligned crop (faces/quality.py: the doctor's blur measure; below ~25 a crop is
blurred) with the face's size in pixels (the box's longer side); the detector's own score says how face-like it is.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
from PIL import Image

from ..faces.quality import sharpness


class TooManyFaces(Exception):
    """More faces in a photo than the service aligns and embeds for one request (--max-faces)."""

    def __init__(self, found: int, limit: int):
        super().__init__(f"{found} faces found; at most {limit} are recognised in one photo (--max-faces): send a "
                         "crop of the part you need")
        self.found = found


def faces_in(embedder, image: Image.Image, *, embed: bool,
             max_faces: Optional[int] = None) -> tuple[list[dict], Optional[np.ndarray], dict]:
    """(one dict per face: box, landmarks, score, quality, usable/reason; embeddings of the usable faces in their
    order (None without ``embed``); timings in ms). TooManyFaces past ``max_faces``, before aligning and embedding:
    a crowd photo must not hold the model thread for hundreds of network passes."""
    aligner = embedder.aligner
    t0 = time.perf_counter()
    detected = aligner.detect(image)
    if max_faces is not None and len(detected) > max_faces:
        raise TooManyFaces(len(detected), max_faces)
    results = aligner.align_each(image, detected)
    t1 = time.perf_counter()
    faces = []
    for r in results:
        face = {"box": [round(v, 1) for v in r.box], "landmarks": [[round(x, 1), round(y, 1)] for x, y in r.landmarks],
                "score": round(float(r.score), 4), "usable": r.image is not None,
                "quality": {"sharpness": None if r.image is None else round(sharpness(r.image, aligner.size), 1),
                            "size_px": round(max(r.box[2] - r.box[0], r.box[3] - r.box[1]), 1)}}
        if r.image is None:
            face["reason"] = r.reason
        faces.append(face)
    crops = [r.image for r in results if r.image is not None]
    embeddings = None
    if embed:
        embeddings = np.asarray(embedder.embed_faces(crops), np.float32) if crops else \
            np.zeros((0, embedder.embedding_dim), np.float32)
    t2 = time.perf_counter()
    return faces, embeddings, {"detect_ms": round((t1 - t0) * 1000, 1), "embed_ms": round((t2 - t1) * 1000, 1)}
