"""Embed face images with an ONNX export (facesiam export --onnx) on onnxruntime: no torch on this path.

The preprocessing is the exported model's eval transform (facesiam.model.eval_transform_for: [centre crop],
bilinear resize, /255, mean/std), written here in PIL + numpy so that a deployment needs neither torch nor
torchvision; tests/test_onnx.py checks both give the same embeddings. A model trained on aligned faces still
needs the MTCNN detector (a torch model) to align raw photos: that step imports torch, `align=False` does not.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from .errors import InputError

log = logging.getLogger("facesiam.onnx")

METADATA_KEY = "facesiam"  # the key facesiam/export.py writes (kept apart so this module never imports torch)


class OnnxEmbedder:
    """``OnnxEmbedder("model.onnx").embed(["a.jpg", "b.jpg"])`` -> unit embeddings (N x D float32)."""

    def __init__(self, path: str | os.PathLike, *, threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise InputError("--onnx needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu)") from None
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file; write one with `facesiam export RUN/best --onnx {path}`")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=list(providers or ort.get_available_providers()))
        except Exception as err:  # onnxruntime raises its own exception types for unreadable models
            raise InputError(f"{path}: not a readable ONNX model ({str(err).splitlines()[0]}); "
                             "export it again with `facesiam export RUN/best --onnx FILE`") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in props:
            raise InputError(f"{path}: no facesiam metadata (input size, mean/std, alignment); "
                             "export it with `facesiam export RUN/best --onnx FILE`")
        self.path = path
        self.meta = json.loads(props[METADATA_KEY])
        self.image_size = int(self.meta["image_size"])
        self._mean = np.asarray(self.meta["mean"], np.float32).reshape(3, 1, 1)
        self._std = np.asarray(self.meta["std"], np.float32).reshape(3, 1, 1)

    @property
    def alignment(self) -> Optional[dict]:
        """How the training faces were aligned (None: trained on unaligned images)."""
        return self.meta.get("alignment") or None

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

    def embed(self, images: Sequence[str | os.PathLike | Image.Image], *, flip: bool = False, align: bool = True,
              batch_size: int = 64) -> np.ndarray:
        """Unit embeddings of image files (read like the training data) or PIL images.

        A model trained on aligned faces gets each image's face detected and aligned the same way first (no face:
        a one-line error naming the image); ``align=False`` feeds the images as they are.
        """
        from .data.images import load_rgb

        names = [str(p) if not isinstance(p, Image.Image) else f"image {i}" for i, p in enumerate(images)]
        missing = [n for n, p in zip(names, images) if not isinstance(p, Image.Image) and not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"image {missing[0]} not found"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        aligner = None
        if align and self.alignment:
            from .data.align import aligner_for, describe_alignment  # MTCNN is a torch model

            aligner = aligner_for(self.alignment, "cpu")
            log.info("aligning %d image(s): %s, as the model was trained (--no-align for aligned crops)",
                     len(names), describe_alignment(self.alignment))
        out = []
        for start in range(0, len(names), batch_size):
            chunk = images[start:start + batch_size]
            pictures = [p.convert("RGB") if isinstance(p, Image.Image) else load_rgb(p) for p in chunk]
            if aligner is not None:
                from .data.align import align_images

                pictures = align_images(pictures, names[start:start + batch_size], aligner)
            out.append(self.embed_arrays(np.stack([self.preprocess(p) for p in pictures]), flip=flip))
        return np.concatenate(out) if out else np.zeros((0, int(self.meta["embedding_dim"])), np.float32)
