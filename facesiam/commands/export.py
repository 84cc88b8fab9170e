"""facesiam export: a trained model -> an ONNX file for onnxruntime / TensorRT, with its preprocessing as metadata.

    python tools/export.py RUN/best --onnx model.onnx [--opset 18] [--fp16]
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from . import command


@command("export")
def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="export", description="Export a trained model to ONNX: dynamic batch, unit "
                                "embeddings out; input size, mean/std, centre crop, face alignment and embedding "
                                "size stored as metadata (facesiam compare/embed --onnx read them).")
    p.add_argument("checkpoint", help="exported model: RUN/best (or a RUN directory)")
    p.add_argument("--onnx", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17; default 18)")
    p.add_argument("--fp16", action="store_true", help="half-precision weights for GPUs (needs onnxconverter-common; "
                   "inputs and outputs stay float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing FILE")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing onnxruntime's embeddings with torch's on random inputs")
    args = p.parse_args(argv)
    from ..export import export_onnx

    summary = export_onnx(args.checkpoint, args.onnx, opset=args.opset, fp16=args.fp16, overwrite=args.overwrite,
                          check=args.check)
    print(f"exported {args.checkpoint} -> {summary['out']}: {summary['backbone']}, {summary['image_size']} px in, "
          f"{summary['embedding_dim']}-d out, opset {summary['opset']}, dynamic batch"
          f"{', fp16' if summary['fp16'] else ''}, {summary['bytes'] / 1e6:.1f} MB ({summary['seconds']:.1f} s)")
    if "min_cosine" in summary:
        print(f"check: onnxruntime vs torch on random inputs, smallest cosine {summary['min_cosine']:.6f}")
    return summary
