"""facesiam compare: cosine similarity of two face images and the same/different decision.

    python tools/compare.py --checkpoint RUN/best IMG1 IMG2 --threshold 0.42
    python tools/compare.py --checkpoint RUN/best IMG1 IMG2 --report REPORT/metrics.json [--operating-point far=1e-3]
"""

from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from . import command
from .common import add_align_argument, add_model_choice, add_threshold_arguments


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare", description="Cosine similarity of two face images and the "
                                "same/different decision at a threshold (given, or from an evaluation report).")
    p.add_argument("image1")
    p.add_argument("image2")
    add_model_choice(p, required=True)
    add_threshold_arguments(p, required=False)
    p.add_argument("--flip", action="store_true", help="add the mirrored image's embedding (if evaluated so)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_align_argument(p)
    return p


@command("compare")
def main(argv: Optional[Sequence[str]] = None) -> dict:
    from ..eval.compare import compare

    args = _parser().parse_args(argv)
    result = compare(args.checkpoint, args.image1, args.image2, threshold=args.threshold, report=args.report,
                     operating_point=args.operating_point, flip=args.flip, device=args.device, align=args.align,
                     onnx=args.onnx)
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    print(f"cosine similarity: {result['similarity']:.4f}")
    if result["threshold"] is None:
        print("no threshold given: pass --threshold T or --report REPORT/metrics.json for a decision")
    else:
        verdict = "SAME person" if result["same"] else "DIFFERENT people"
        print(f"threshold: {result['threshold']:.4f} ({result['threshold_source']})")
        print(f"decision: {verdict}")
    return result
