"""Compare two face images: cosine similarity of their embeddings and the same/different decision.

    python tools/compare.py --checkpoint RUN/best IMG1 IMG2 --threshold 0.42
    python tools/compare.py --checkpoint RUN/best IMG1 IMG2 --report REPORT/metrics.json [--operating-point far=1e-3]

The seed article's siamese_inference.py, done right: the same preprocessing as evaluation (the exported model's
eval transform, images read like the training data), unit-length embeddings, and a threshold that comes from an
evaluation report of the same model (or is given), always printed with where it came from.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

OPERATING_POINTS = ("best", "eer", "pairs", "far=1e-1", "far=1e-2", "far=1e-3", "far=1e-4", "far=1e-5", "far=1e-6")


def embed_images(checkpoint: str | os.PathLike, images: Sequence[str | os.PathLike], *, flip: bool = False,
                 device: Optional[str] = None, batch_size: int = 64) -> np.ndarray:
    """Unit embeddings (len(images) x D float32) of image files with an exported model."""
    from .data.images import load_rgb
    from .embed import _embed
    from .model import eval_transform_for, load_exported

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_exported(checkpoint, device=dev)
    transform = eval_transform_for(cfg)
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = []
            for path in images[start:start + batch_size]:
                if not Path(path).is_file():
                    raise FileNotFoundError(f"image {path} not found")
                batch.append(transform(load_rgb(path)))
            out.append(_embed(model, torch.stack(batch).to(dev), flip).cpu())
    return torch.cat(out).numpy()


def threshold_from_report(report: str | os.PathLike, operating_point: str = "best") -> tuple[float, str]:
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
        what = f"FAR <= {key}, TAR {(v.get('tar_at_far') or {}).get(key)}"
    else:
        raise ValueError(f"unknown operating point {operating_point!r}: use one of {OPERATING_POINTS}")
    if value is None:
        raise ValueError(f"{path} has no threshold for operating point {operating_point!r} (too few pairs?)")
    model = (metrics.get("source") or {}).get("checkpoint")
    return float(value), f"{path}: {operating_point} ({what})" + (f", model {model}" if model else "")


def compare(checkpoint: str | os.PathLike, image1: str, image2: str, *, threshold: Optional[float] = None,
            report: Optional[str] = None, operating_point: str = "best", flip: bool = False,
            device: Optional[str] = None) -> dict:
    """{"similarity", "threshold", "threshold_source", "same"} (same is None without a threshold)."""
    source = None
    if threshold is not None:
        source = "given (--threshold)"
    elif report is not None:
        threshold, source = threshold_from_report(report, operating_point)
    emb = embed_images(checkpoint, [image1, image2], flip=flip, device=device)
    similarity = float(np.dot(emb[0], emb[1]))
    return {"image1": str(image1), "image2": str(image2), "similarity": similarity, "threshold": threshold,
            "threshold_source": source, "same": None if threshold is None else bool(similarity >= threshold)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="compare", description="Cosine similarity of two face images and the "
                                "same/different decision at a threshold (given, or from an evaluation report).")
    p.add_argument("image1")
    p.add_argument("image2")
    p.add_argument("--checkpoint", required=True, help="exported model: RUN/best (or a RUN directory)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, help="decide 'same' when similarity >= THRESHOLD")
    group.add_argument("--report", help="take the threshold from REPORT/metrics.json (tools/evaluate.py)")
    p.add_argument("--operating-point", default="best", choices=OPERATING_POINTS,
                   help="which threshold of the report (default: best balanced accuracy over all pairs)")
    p.add_argument("--flip", action="store_true", help="add the mirrored image's embedding (if evaluated so)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    try:
        result = compare(args.checkpoint, args.image1, args.image2, threshold=args.threshold, report=args.report,
                         operating_point=args.operating_point, flip=args.flip, device=args.device)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"compare: {err}") from None
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"cosine similarity: {result['similarity']:.4f}")
    if result["threshold"] is None:
        print("no threshold given: pass --threshold T or --report REPORT/metrics.json for a decision")
    else:
        verdict = "SAME person" if result["same"] else "DIFFERENT people"
        print(f"threshold: {result['threshold']:.4f} ({result['threshold_source']})")
        print(f"decision: {verdict}")


if __name__ == "__main__":
    main()
