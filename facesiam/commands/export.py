"""facesiam export: a trained model -> an ONNX file for onnxruntime / TensorRT, with its preprocessing as metadata.

    python tools/export.py RUN/best --onnx model.onnx [--opset 18] [--fp16]
    python tools/export.py RUN/best --onnx model.int8.onnx --int8 --data SHARDS [--parity-data HELD_OUT]
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..errors import InputError
from . import command
from .common import add_align_argument


@command("export")
def main(argv: Optional[Sequence[str]] = None) -> dict:
    from ..quantize import CALIBRATION_IMAGES, INT8_AUC_TOLERANCE, INT8_FAR, INT8_TAR_TOLERANCE, INT8_WEIGHTS

    p = argparse.ArgumentParser(prog="export", description="Export a trained model to ONNX: dynamic batch, unit "
                                "embeddings out; input size, mean/std, centre crop, face alignment and embedding "
                                "size stored as metadata (facesiam compare/embed --onnx read them).")
    p.add_argument("checkpoint", help="exported model: RUN/best (or a RUN directory)")
    p.add_argument("--onnx", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17; default 18)")
    p.add_argument("--fp16", action="store_true", help="half-precision weights for GPUs (needs onnxconverter-common; "
                   "inputs and outputs stay float32)")
    p.add_argument("--flip", action="store_true", help="embed each face with its mirror image (the sum, normalised: "
                   "evaluate --flip's embedding, at twice the network's work); recorded in the metadata")
    p.add_argument("--int8", action="store_true", help="int8 model for CPUs (onnxruntime static quantization, QDQ, "
                   "per-channel weights) calibrated on --data's training photos; written only if on held-out people "
                   f"its TAR@FAR={INT8_FAR:g} is within {INT8_TAR_TOLERANCE:g} and its AUC within "
                   f"{INT8_AUC_TOLERANCE:g} of fp32's (the numbers go into its metadata; serve shows them)")
    p.add_argument("--data", metavar="SHARDS", help="--int8: the training data (shards, RecordIO or an image folder): "
                   "calibration photos from its train split, parity on its val split")
    p.add_argument("--parity-data", metavar="DATA", help="--int8: held-out people to measure parity on (default: "
                   "--data's val split)")
    p.add_argument("--parity-split", default="val", help="--int8: split of the parity data (default val)")
    p.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES,
                   help=f"--int8: training photos to calibrate on (default {CALIBRATION_IMAGES})")
    p.add_argument("--int8-weights", choices=INT8_WEIGHTS, default="auto",
                   help="--int8: portable (7-bit weights where x86 CPUs without VNNI would saturate: the file runs at "
                   "its measured accuracy on every CPU), full (8-bit: exact only on x86 with VNNI/AMX and ARM64; "
                   "serve refuses it elsewhere), auto (default: portable; full when portable misses parity and this "
                   "CPU is exact)")
    p.add_argument("--threads", type=int, default=None, help="--int8: onnxruntime threads for the parity check")
    add_align_argument(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing FILE")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing onnxruntime's embeddings with torch's on random inputs")
    args = p.parse_args(argv)
    if args.int8 and args.fp16:
        raise InputError("--int8 and --fp16 exclude each other: int8 is for CPUs, fp16 for GPUs")
    if args.int8 and not args.data:
        raise InputError("--int8 needs --data SHARDS: the training photos to calibrate on (and, without "
                         "--parity-data, the val split to check its accuracy on)")
    if args.data and not args.int8:
        raise InputError("--data is for --int8 (calibration photos); an fp32/fp16 export needs no data")
    from ..export import export_onnx
    from ..quantize import export_int8

    if args.int8:
        from ..onnx_runtime import parity_line

        summary = export_int8(args.checkpoint, args.onnx, data=args.data, parity_data=args.parity_data,
                              parity_split=args.parity_split, calibration_images=args.calibration_images,
                              opset=args.opset, overwrite=args.overwrite, check=args.check, align=args.align,
                              threads=args.threads, flip=args.flip, weights=args.int8_weights)
    else:
        summary = export_onnx(args.checkpoint, args.onnx, opset=args.opset, fp16=args.fp16, flip=args.flip,
                              overwrite=args.overwrite, check=args.check)
    precision = (", fp16" if summary["fp16"] else ", int8" if summary.get("int8") else "") + \
        (", with the mirror image" if summary.get("flip") else "")
    print(f"exported {args.checkpoint} -> {summary['out']}: {summary['backbone']}, {summary['image_size']} px in, "
          f"{summary['embedding_dim']}-d out, opset {summary['opset']}, dynamic batch"
          f"{precision}, {summary['bytes'] / 1e6:.1f} MB ({summary['seconds']:.1f} s)")
    if "min_cosine" in summary:
        print(f"check: onnxruntime vs torch on random inputs, smallest cosine {summary['min_cosine']:.6f}")
    if summary.get("int8"):
        parity = summary["parity"]
        print(f"int8: {summary['calibration']['weights']} weights, calibrated on {summary['calibration']['images']} "
              f"training photos; on {parity['images']} photos "
              f"of {parity['identities']} held-out people: {parity_line(parity)}")
    return summary
