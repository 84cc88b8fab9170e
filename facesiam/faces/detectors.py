"""Face detectors behind one small interface: photos in, every face's box, score and 5 landmarks out.

A detector is registered by name in ``DETECTORS`` (``--detector NAME``; recorded in alignment_info so that
inference detects as training did). It only finds faces: which one to keep and how to align it is
faces/aligner.py's job, so a second detector (or a teacher with its own preprocessing) plugs in here without
touching the aligner.

* ``mtcnn``: MTCNN from facenet-pytorch (MIT; its wheel ships the P/R/O-net weights, so nothing is downloaded).
  Its metadata pins torch<2.3 but it runs unchanged on newer torch, so it is installed without its
  dependencies: ``pip install --no-deps facenet-pytorch``. It is imported only when a detector is built.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import numpy as np
from PIL import Image

from ..device import resolve_device
from ..errors import InputError
from ..registry import Registry

DETECTORS = Registry("detector")

MTCNN_THRESHOLDS = (0.6, 0.7, 0.7)  # facenet-pytorch's defaults for the P, R and O stages
MTCNN_FACTOR = 0.709  # image pyramid step (its default)
MTCNN_SMALLEST_WINDOW = 12  # px: below it MTCNN's pyramid would enlarge the photo
MTCNN_INSTALL_HINT = "pip install --no-deps facenet-pytorch"
CPU_BATCH = 16  # images per MTCNN call on CPU: 20-30 % faster than one at a time on one thread (bench_align)
GPU_BATCH = 64


@dataclass
class Face:
    """One detection: box (x0, y0, x1, y1), detector score and the 5 landmarks (5x2, in template order)."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    @property
    def size(self) -> float:
        """The box's longer side (what min_face_size refers to)."""
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))

    @property
    def center(self) -> np.ndarray:
        return (self.box[:2] + self.box[2:]) / 2


class Detector(Protocol):
    """What the aligner needs of a detector."""

    min_face_size: int
    """Smallest face searched for, in source pixels (the box's longer side)."""
    batch_size: int
    """Images per call of the underlying network."""

    def detect_batch(self, images: Sequence[Image.Image]) -> list[list[Face]]:
        """Every face in each RGB image (EXIF already applied), any size, in any order."""

    def info(self) -> dict[str, Any]:
        """How it detects, for alignment_info: ``name`` (as registered) and whatever settings change its output."""


def package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_detector(name: str, *, device: str = "cpu", min_face_size: int = 20,
                   batch_size: Optional[int] = None) -> Detector:
    """The registered detector ``name`` (an unknown name is a one-line error listing the known ones)."""
    return DETECTORS.get(name.lower()).build(device=device, min_face_size=min_face_size, batch_size=batch_size)


def _as_faces(boxes: Any, probs: Any, points: Any) -> list[Face]:
    """One image's detections from MTCNN.detect as Faces.

    MTCNN packs its results into numpy object arrays: (n_images, n_faces, 4) of Python floats when every image
    has the same number of faces, a 1-D array of per-image arrays when the counts differ, None for an image
    without faces. Converting each image's entry on its own handles every case.
    """
    if boxes is None or probs is None or points is None:
        return []
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    probs = np.asarray(probs, np.float64).reshape(-1)
    points = np.asarray(points, np.float64).reshape(-1, 5, 2)
    return [Face(b, float(s), p) for b, s, p in zip(boxes, probs, points)]


def load_mtcnn(device: str = "cpu", min_face_size: int = 20) -> Any:
    """facenet-pytorch's MTCNN with its shipped weights, returning every face (selection is the aligner's)."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError:
        raise InputError(f"face alignment needs facenet-pytorch, which is not installed: {MTCNN_INSTALL_HINT} "
                         f"(--no-deps: its metadata pins an old torch, but it runs on this one)") from None
    return MTCNN(min_face_size=min_face_size, thresholds=list(MTCNN_THRESHOLDS), factor=MTCNN_FACTOR,
                 keep_all=True, select_largest=False, device=resolve_device(device))


@DETECTORS.register("mtcnn", doc="MTCNN (facenet-pytorch): box, score and 5 landmarks; CPU or CUDA")
class MTCNNDetector:
    """MTCNN's three cascaded networks; same-sized images are batched (MTCNN only batches equal sizes)."""

    name = "MTCNN"  # as recorded in alignment_info since version 1 of the record

    def __init__(self, device: str = "cpu", min_face_size: int = 20, batch_size: Optional[int] = None):
        if min_face_size < MTCNN_SMALLEST_WINDOW:
            raise InputError(f"min_face_size must be >= {MTCNN_SMALLEST_WINDOW} pixels (MTCNN's smallest window), "
                             f"got {min_face_size}")
        self.device, self.min_face_size = device, min_face_size
        self.batch_size = batch_size or (GPU_BATCH if str(device).startswith("cuda") else CPU_BATCH)
        self.mtcnn = load_mtcnn(device, min_face_size)

    def detect_batch(self, images: Sequence[Image.Image]) -> list[list[Face]]:
        found: list[list[Face]] = [[] for _ in images]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            if min(img.size) >= self.min_face_size:  # smaller: MTCNN's pyramid would be empty (it would crash)
                by_size.setdefault(img.size, []).append(i)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                part = indices[start:start + self.batch_size]
                boxes, probs, points = self.mtcnn.detect([images[i] for i in part], landmarks=True)
                for k, i in enumerate(part):
                    found[i] = _as_faces(boxes[k], probs[k], points[k])
        return found

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "package": "facenet-pytorch", "version": package_version("facenet-pytorch"),
                "thresholds": list(MTCNN_THRESHOLDS), "factor": MTCNN_FACTOR}
