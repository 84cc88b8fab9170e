"""Export a trained model to ONNX for deployment without the training stack (onnxruntime, TensorRT, ...).

The file holds the network (unit embeddings out, dynamic batch) and, as metadata, everything inference needs to
feed it the way it was trained: input size, mean/std, centre crop, the face alignment (if any) and the embedding
size. facesiam/onnx_runtime.py reads both back without torch.

The int8 model for CPUs (``facesiam export --int8``) is made from this export by facesiam/quantize.py.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from .errors import FacesiamError, InputError
from .fileio import atomic_write
from .model import embed_with_mirror, exported_alignment, load_exported
from .onnx_runtime import METADATA_KEY  # metadata_props key holding the JSON of onnx_metadata

log = logging.getLogger("facesiam.export")

ONNX_FORMAT_VERSION = 1
MIN_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"


class ExportError(FacesiamError, RuntimeError):
    """The network cannot be exported to ONNX (an operator the exporter does not know, ...)."""


def onnx_metadata(checkpoint: str | os.PathLike, cfg, *, fp16: bool, flip: bool = False) -> dict:
    """What an ONNX consumer needs besides the graph (stored as JSON under metadata key "facesiam")."""
    return {"format_version": ONNX_FORMAT_VERSION, "backbone": cfg.backbone, "head": cfg.head,
            "embedding_dim": cfg.embedding_dim, "image_size": cfg.image_size, "mean": list(cfg.mean),
            "std": list(cfg.std), "center_crop": cfg.center_crop, "alignment": exported_alignment(checkpoint),
            "input": INPUT_NAME, "output": OUTPUT_NAME, "layout": "NCHW, RGB, float32 normalised by mean/std",
            "fp16_weights": fp16, "flip": flip, "source": str(checkpoint)}


class FlipSum(torch.nn.Module):
    """A model whose embedding of a face is the sum of its embeddings of the face and its mirror image, normalised:
    the LFW evaluation convention (eval/embed.py, ``flip``) built into the graph, so that every consumer of the
    file (serve, compare, the gallery) scores as the evaluation that chose its threshold did, at twice the
    network's work."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return embed_with_mirror(self.model, images)


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, *, opset: int = 18, fp16: bool = False,
                flip: bool = False, overwrite: bool = False, check: bool = True) -> dict:
    """RUN/best -> out.onnx (dynamic batch, metadata); returns a summary with the torch/onnxruntime parity check.

    flip: each face embedded with its mirror image (FlipSum), as ``evaluate --flip`` scores.

    fp16 stores the weights and activations in half precision (inputs and outputs stay float32); meant for GPUs,
    onnxruntime on CPU runs fp16 slower than fp32. The file appears complete or not at all.
    """
    import onnx

    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists: pass --overwrite to replace it")
    if opset < MIN_OPSET:
        raise InputError(f"--opset {opset}: facesiam exports opset >= {MIN_OPSET}")
    model, cfg = load_exported(checkpoint, device="cpu")
    if flip:
        model = FlipSum(model).eval()
    example = torch.zeros(2, 3, cfg.image_size, cfg.image_size)
    start = time.perf_counter()
    try:
        program = torch.onnx.export(model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    opset_version=opset, dynamo=True, verbose=False,
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}})
        proto = program.model_proto
    except Exception as err:  # the exporter raises many types; all mean "this network does not export"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"{checkpoint}: backbone {cfg.backbone!r} does not export to ONNX ({first}); "
                          "train with another --backbone (efficientnet/resnet/mobilenet families export)") from None
    if fp16:
        proto = _to_fp16(proto)
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(onnx_metadata(checkpoint, cfg, fp16=fp16, flip=flip))})
    onnx.checker.check_model(proto)
    with atomic_write(out, "wb") as f:
        f.write(proto.SerializeToString())
    summary = {"out": str(out), "opset": opset, "backbone": cfg.backbone, "image_size": cfg.image_size,
               "embedding_dim": cfg.embedding_dim, "fp16": fp16, "flip": flip, "bytes": out.stat().st_size,
               "seconds": time.perf_counter() - start}
    if check:
        summary["min_cosine"] = parity_check(model, out, cfg.image_size)
    return summary


def _to_fp16(proto):
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise InputError("--fp16 needs onnxconverter-common: pip install onnxconverter-common") from None
    return float16.convert_float_to_float16(proto, keep_io_types=True)


def parity_check(model: torch.nn.Module, onnx_path: str | os.PathLike, image_size: int, n: int = 4,
                 seed: int = 0) -> float:
    """The smallest cosine between torch's and onnxruntime's embeddings of n random inputs (1.0 = identical)."""
    import onnxruntime as ort

    x = np.random.default_rng(seed).standard_normal((n, 3, image_size, image_size)).astype(np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0].astype(np.float32)
    return float(np.min(np.sum(ref * got, axis=1) / np.linalg.norm(got, axis=1)))
