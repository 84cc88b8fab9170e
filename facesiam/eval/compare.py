"""Compare two face images: cosine similarity of their embeddings and the same/different decision.

The seed article's siamese_inference.py, done right: the same preprocessing as evaluation (the exported model's
eval transform, images read like the training data), unit-length embeddings, and a threshold that comes from an
evaluation report of the same model (or is given), always printed with where it came from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError

OPERATING_POINTS = ("best", "eer", "pairs", "far=1e-1", "far=1e-2", "far=1e-3", "far=1e-4", "far=1e-5", "far=1e-6")
# The strict point a deployed verifier uses (one impostor pair in a thousand accepted). compare and serve share it,
# so compare --report prints the decision the service makes with the same report; "best" balanced accuracy sits
# where far more impostors pass, because over all pairs impostors outnumber genuine pairs by orders of magnitude.
DEFAULT_OPERATING_POINT = "far=1e-3"


def threshold_from_report(report: str | os.PathLike,
                          operating_point: str = DEFAULT_OPERATING_POINT) -> tuple[float, str]:
    """(threshold, description) for an operating point of an evaluation report (REPORT or REPORT/metrics.json).

    best: all-pairs threshold of best balanced accuracy; eer: the EER threshold; pairs: the mean 10-fold
    threshold of the pairs-file protocol; far=1e-3 (etc.): the lowest threshold with FAR <= 1e-3 (all pairs).
    """
    path = Path(report)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"evaluation report {path} not found; make one with tools/evaluate.py --out REPORT")
    metrics = json.loads(path.read_text(encoding="utf-8"))
    v, pairs = metrics.get("verification") or {}, metrics.get("pairs") or {}
    if operating_point == "best" and v.get("best_threshold") is None and pairs.get("threshold") is not None:
        operating_point = "pairs"
    if operating_point == "best":
        value, what = v.get("best_threshold"), f"best balanced accuracy {v.get('best_accuracy')}"
    elif operating_point == "eer":
        value, what = v.get("eer_threshold"), f"EER {v.get('eer')}"
    elif operating_point == "pairs":
        value, what = pairs.get("threshold"), f"pairs 10-fold accuracy {pairs.get('accuracy_mean')}"
    elif operating_point.startswith("far="):
        key = f"{float(operating_point[4:]):.0e}"
        value = (v.get("threshold_at_far") or {}).get(key)
        tar = (v.get('tar_at_far') or {}).get(key)
        what = f"FAR <= {key}, TAR {'n/a' if tar is None else f'{tar:.4f}'}"
    else:
        raise InputError(f"unknown operating point {operating_point!r}: use one of {OPERATING_POINTS}")
    if value is None:
        hint = " (too few pairs?)"
        if operating_point != "pairs" and pairs.get("threshold") is not None:
            hint = "; it has a pairs-file threshold: use --operating-point pairs"
        raise InputError(f"{path} has no threshold for operating point {operating_point!r}{hint}")
    model = (metrics.get("source") or {}).get("checkpoint")
    return float(value), f"{path}: {operating_point} ({what})" + (f", model {model}" if model else "")


def decision_threshold(threshold: Optional[float], report: Optional[str | os.PathLike],
                       operating_point: str = DEFAULT_OPERATING_POINT) -> tuple[Optional[float], Optional[str]]:
    """(threshold, where it came from): the one given, else the report's at ``operating_point``, else (None, None)."""
    if threshold is not None:
        return float(threshold), "given (--threshold)"
    if report is not None:
        return threshold_from_report(report, operating_point)
    return None, None


def compare(checkpoint: str | os.PathLike, image1: str, image2: str, *, threshold: Optional[float] = None,
            report: Optional[str] = None, operating_point: str = DEFAULT_OPERATING_POINT, flip: bool = False,
            device: Optional[str] = None, align: bool = True, onnx: Optional[str | os.PathLike] = None) -> dict:
    """{"similarity", "threshold", "threshold_source", "same"} (same is None without a threshold).

    onnx: an ONNX export (facesiam export --onnx) to run on onnxruntime instead of the torch checkpoint.
    """
    threshold, source = decision_threshold(threshold, report, operating_point)
    if onnx is not None:
        from ..onnx_runtime import OnnxEmbedder  # no torch on this path (unless the faces must be aligned)

        emb = OnnxEmbedder(onnx).embed([image1, image2], flip=flip, align=align)
    else:
        from .embed import embed_images

        emb = embed_images(checkpoint, [image1, image2], flip=flip, device=device, align=align)
    similarity = float(np.dot(emb[0], emb[1]))
    return {"image1": str(image1), "image2": str(image2), "similarity": similarity, "threshold": threshold,
            "threshold_source": source, "same": None if threshold is None else bool(similarity >= threshold)}
