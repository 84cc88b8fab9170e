"""Raw photos seen through the aligner, as a data set: for evaluating an aligned model on raw images."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from PIL import Image

from ..data.readers import _FaceDataset
from .aligner import FaceAligner, aligner_for
from .template import center_crop

log = logging.getLogger("facesiam.align")


class AlignedView(_FaceDataset):
    """A data set of raw photos seen through the face aligner: ``view[i]`` = (transform(aligned face i), label).

    For evaluating an aligned model on raw images. An image without a usable face is centre-cropped with a
    warning naming it (evaluation keeps every image, so that N and the labels stay those of the data). The
    detector is built lazily in each process (DataLoader workers), never pickled.
    """

    def __init__(self, base: Any, info: dict[str, Any], transform: Optional[Callable] = None, device: str = "cpu"):
        self.base, self.info, self.transform, self.device = base, info, transform, device
        self.labels, self.classes, self.paths = base.labels, base.classes, base.paths
        self._aligner: Optional[FaceAligner] = None
        aligner_for(info, device)  # checks the detector, the template and the install before any work

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_aligner": None}

    def _image(self, index: int) -> Image.Image:
        if self._aligner is None:
            self._aligner = aligner_for(self.info, self.device)
        image = self.base._image(index)
        result = self._aligner.align(image)
        if result.image is None:
            log.warning("%s: %s; using a centre crop", self.paths[index], result.reason)
            return center_crop(image, self._aligner.size)
        return result.image
