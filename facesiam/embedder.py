"""What every way of running a trained model shares: image files or PIL images in, unit embeddings out, the faces
detected and aligned first when the model was trained on aligned faces.

Two subclasses run the network: ``facesiam.eval.embed.TorchEmbedder`` (an exported checkpoint) and
``facesiam.onnx_runtime.OnnxEmbedder`` (an ONNX export, no torch). The service batches ``align`` and
``embed_faces`` across requests itself; ``embed`` is the whole path for scripts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from .errors import and_more

log = logging.getLogger("facesiam.embed")


class FaceEmbedder:
    """Base class: subclasses set ``alignment``, ``embedding_dim`` and ``device`` and implement ``embed_faces``."""

    alignment: Optional[dict] = None
    """How the training faces were aligned (alignment_info), or None: trained on unaligned images."""
    embedding_dim: int
    device: str = "cpu"
    _aligner = None

    def embed_faces(self, pictures: Sequence[Image.Image], *, flip: bool = False) -> np.ndarray:
        """RGB images that are already what the network takes (aligned faces, or any image for an unaligned
        model) -> unit embeddings, len(pictures) x embedding_dim float32."""
        raise NotImplementedError

    @property
    def aligner(self):
        """The FaceAligner that aligns as the model was trained (None for an unaligned model); built once."""
        if self.alignment and self._aligner is None:
            from .faces.aligner import aligner_for  # MTCNN is a torch model: imported only when needed

            self._aligner = aligner_for(self.alignment, self.device)
        return self._aligner if self.alignment else None

    def embed(self, images: Sequence[str | os.PathLike | Image.Image], *, flip: bool = False, align: bool = True,
              batch_size: int = 64) -> np.ndarray:
        """Unit embeddings of image files (read like the training data) or PIL images.

        A model trained on aligned faces gets each image's face detected and aligned the same way first (no face:
        a one-line error naming the image); ``align=False`` feeds the images as they are.
        """
        from .data.images import load_rgb

        names = [f"image {i}" if isinstance(p, Image.Image) else str(p) for i, p in enumerate(images)]
        missing = [n for n, p in zip(names, images) if not isinstance(p, Image.Image) and not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"image {missing[0]} not found{and_more(missing)}")
        aligner = self.aligner if align else None
        if aligner is not None:
            from .faces.aligner import describe_alignment

            log.info("aligning %d image(s): %s, as the model was trained (--no-align for aligned crops)",
                     len(names), describe_alignment(self.alignment))
        out = []
        for start in range(0, len(names), batch_size):
            chunk = images[start:start + batch_size]
            pictures = [p.convert("RGB") if isinstance(p, Image.Image) else load_rgb(p) for p in chunk]
            if aligner is not None:
                from .faces.aligner import align_images

                pictures = align_images(pictures, names[start:start + batch_size], aligner)
            out.append(self.embed_faces(pictures, flip=flip))
        return np.concatenate(out) if out else np.zeros((0, self.embedding_dim), np.float32)
