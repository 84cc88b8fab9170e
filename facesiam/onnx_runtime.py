"""Embed face images with an ONNX export (facesiam export --onnx) on onnxruntime: no torch on this path.

The preprocessing is the exported model's eval transform (facesiam.model.eval_transform_for: [centre crop],
bilinear resize, /255, mean/std), written here in PIL + numpy so that a deployment needs neither torch nor
torchvision; tests/test_export.py checks both give the same embeddings. A model trained on aligned faces still
needs the MTCNN detector (a torch model) to align raw photos: that step imports torch, `align=False` does not.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from .embedder import FaceEmbedder
from .errors import InputError
from .onnx_session import METADATA_KEY, open_session

log = logging.getLogger("facesiam.onnx")


def parity_line(parity: dict) -> str:
    """An int8 export's parity with fp32 (its metadata's int8.parity) in one line, for logs, errors and /status."""
    f, q = parity["fp32"], parity["int8"]
    return (f"TAR@FAR={parity['far']:g} {q['tar']:.4f} vs fp32 {f['tar']:.4f} (gap {parity['tar_gap']:.4f}, at most "
            f"{parity['tolerance']['tar']:g}), AUC {q['auc']:.4f} vs fp32 {f['auc']:.4f} (gap "
            f"{parity['auc_gap']:.4f}, at most {parity['tolerance']['auc']:g})")


@lru_cache(maxsize=1)
def int8_products_exact() -> Optional[bool]:
    """Whether onnxruntime's int8 matrix products are exact on this CPU for full-range (8-bit) weights: True on x86
    with VNNI or AMX (vpdpbusd sums u8 x s8 products in 32 bits) and on ARM64 (widening multiplies); False on x86
    without them, where the u8 x s8 kernel adds pairs of products in saturating 16 bits (vpmaddubsw) and 8-bit
    weights overflow it; None where this cannot be told (not Linux x86 or ARM)."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return True
    if machine not in ("x86_64", "amd64"):
        return None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    return re.search(r"\b(avx512_vnni|avx_vnni|amx_int8)\b", cpuinfo) is not None


class OnnxEmbedder(FaceEmbedder):
    """``OnnxEmbedder("model.onnx").embed(["a.jpg", "b.jpg"])`` -> unit embeddings (N x D float32)."""

    def __init__(self, path: str | os.PathLike, *, threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None):
        path = Path(path)
        self.session = open_session(path, threads=threads, providers=providers,
                                    missing_hint=f"write one with `facesiam export RUN/best --onnx {path}`",
                                    unreadable_hint="export it again with `facesiam export RUN/best --onnx FILE`")
        props = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in props:
            raise InputError(f"{path}: no facesiam metadata (input size, mean/std, alignment); "
                             "export it with `facesiam export RUN/best --onnx FILE`")
        self.path = path
        self.meta = json.loads(props[METADATA_KEY])
        self.image_size = int(self.meta["image_size"])
        self.embedding_dim = int(self.meta["embedding_dim"])
        self.alignment = self.meta.get("alignment") or None
        self._mean = np.asarray(self.meta["mean"], np.float32).reshape(3, 1, 1)
        self._std = np.asarray(self.meta["std"], np.float32).reshape(3, 1, 1)
        self._check_int8_weights()

    def _check_int8_weights(self) -> None:
        """An int8 export with full 8-bit weights (export --int8 on a CPU with VNNI) keeps its parity only where
        int8 products are exact: refuse it where they saturate, warn where that cannot be told."""
        weights = ((self.meta.get("int8") or {}).get("calibration") or {}).get("weights")
        if weights != "full":
            return
        exact = int8_products_exact()
        if exact is False:
            raise InputError(f"{self.path}: int8 with full 8-bit weights, which this CPU (x86 without VNNI) sums "
                             "in saturating 16-bit pairs: it would lose the accuracy its parity check measured; "
                             "export it again on this CPU (export --int8 keeps 7-bit weights here) or serve the "
                             "fp32 export")
        if exact is None:
            log.warning("%s: int8 with full 8-bit weights, measured on a CPU with VNNI; this CPU (%s) was not "
                        "recognised: if it is x86 without VNNI its int8 products saturate and accuracy drops",
                        self.path, platform.machine())

    def describe(self, parity: bool = True) -> str:
        """'model.onnx (onnxruntime)'; an int8 export (facesiam export --int8) says so, and with ``parity`` its
        parity with fp32 on held-out people."""
        int8 = self.meta.get("int8")
        if not int8:
            return f"{self.path} (onnxruntime{', fp16' if self.meta.get('fp16_weights') else ''})"
        return f"{self.path} (onnxruntime, int8{'; held-out people: ' + parity_line(int8['parity']) if parity else ''})"

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """PIL RGB image -> 3 x S x S float32, exactly as facesiam.model.eval_transform_for (torchvision on PIL)."""
        fraction = self.meta.get("center_crop")
        if fraction:
            side = max(1, round(fraction * min(image.size)))
            left = int(round((image.width - side) / 2.0))  # torchvision's center_crop rounding
            top = int(round((image.height - side) / 2.0))
            image = image.crop((left, top, left + side, top + side))
        image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (x - self._mean) / self._std

    def embed_arrays(self, batch: np.ndarray, *, flip: bool = False) -> np.ndarray:
        """Preprocessed N x 3 x S x S float32 -> unit embeddings; flip adds the mirrored images' embeddings."""
        run = lambda x: self.session.run(None, {self.meta["input"]: np.ascontiguousarray(x)})[0].astype(np.float32)
        emb = run(batch)
        if flip:  # LFW convention, as facesiam.eval.embed
            emb = emb + run(batch[..., ::-1])
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def embed_faces(self, pictures: Sequence[Image.Image], *, flip: bool = False) -> np.ndarray:
        """RGB images the network takes as they are -> unit embeddings."""
        if not pictures:
            return np.zeros((0, self.embedding_dim), np.float32)
        return self.embed_arrays(np.stack([self.preprocess(p) for p in pictures]), flip=flip)
