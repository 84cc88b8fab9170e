"""The 5-point face template and the geometry that maps a face onto it: ArcFace's 112x112 layout.

* Alignment is the similarity transform (rotation, uniform scale, translation) that maps 5 detected points onto
  the template in the least-squares sense (skimage's ``SimilarityTransform``, Umeyama's method, as insightface's
  ``norm_crop`` does), then a bilinear warp with PIL onto a black background.
* Coordinates are pixel indices (pixel i centred at i), as in cv2 and insightface.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps
from skimage.transform import SimilarityTransform

from ..errors import InputError

# The ArcFace / insightface template (112x112 output): left eye, right eye, nose tip, left and right mouth
# corner, in pixel-index coordinates ("left" = the image's left, the person's right eye).
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
TEMPLATE_SIZE = 112
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
BORDER = (0, 0, 0)  # pixels the warp takes from outside the photo are black, as in insightface (borderValue=0)


def arcface_template(size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The 5 template points (5x2, pixel-index coordinates) for a ``size`` x ``size`` crop: scaled by size/112."""
    return ARCFACE_TEMPLATE_112 * (size / TEMPLATE_SIZE)


def estimate_transform(landmarks: np.ndarray, size: int = TEMPLATE_SIZE) -> SimilarityTransform:
    """Least-squares similarity transform from the 5 landmarks (pixel-index coordinates) onto the template.

    Raises InputError when the points are degenerate (e.g. all equal), so no transform exists.
    """
    tform = SimilarityTransform.from_estimate(np.asarray(landmarks, np.float64).reshape(5, 2), arcface_template(size))
    if not tform:  # skimage returns a falsy FailedEstimation instead of raising
        raise InputError(f"cannot align: no similarity transform fits these landmarks ({tform})")
    return tform


def _shift(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def warp(image: Image.Image, tform: SimilarityTransform, size: int = TEMPLATE_SIZE) -> Image.Image:
    """Warp ``image`` with ``tform`` (source -> crop, pixel-index coordinates) into a ``size`` x ``size`` crop.

    Bilinear like insightface's cv2.warpAffine. A bilinear warp samples 4 pixels, so a face more than twice the
    crop's size would alias; the photo is then first shrunk by an integer factor with a box filter
    (PIL's reduce), only over the region the crop covers.
    """
    inverse = np.linalg.inv(tform.params)  # crop index -> source index
    factor = max(1, int(0.5 / tform.scale))  # leaves the warp itself scaling by >= 0.5
    # PIL samples in continuous coordinates (pixel i spans [i, i+1)); landmarks and the template are pixel
    # indices (pixel i centred at i), as in cv2 and insightface: convert at both ends.
    to_source = _shift(0.5, 0.5) @ inverse @ _shift(-0.5, -0.5)
    if factor > 1:
        corners = to_source @ np.array([[0, size, 0, size], [0, 0, size, size], [1, 1, 1, 1]], np.float64)
        (x0, x1), (y0, y1) = ((int(np.floor(c.min())) - factor, int(np.ceil(c.max())) + factor) for c in corners[:2])
        box = (max(0, x0), max(0, y0), min(image.width, x1), min(image.height, y1))
        if box[2] > box[0] and box[3] > box[1]:  # PIL rounds a partial last block up (averaging fewer pixels)
            image = image.reduce(factor, box=box)
            to_source = np.diag([1 / factor, 1 / factor, 1.0]) @ _shift(-box[0], -box[1]) @ to_source
    coeffs = tuple(to_source[:2].ravel())
    return image.transform((size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR,
                           fillcolor=BORDER)


def center_crop(image: Image.Image, size: int = TEMPLATE_SIZE) -> Image.Image:
    """The central square of the shorter side, resized to ``size`` (the fallback when no face is found)."""
    return ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS)


def inside(points: np.ndarray, image_size: tuple[int, int]) -> bool:
    """Whether every point lies on the image (pixel-index coordinates)."""
    return bool(np.all(points >= -0.5) and np.all(points <= np.asarray(image_size, np.float64) - 0.5))


def template_info(size: int) -> dict:
    """The template as recorded in alignment_info (dataset.json, an exported model's config.json)."""
    return {"name": "arcface", "points": [[round(float(x), 4), round(float(y), 4)] for x, y in arcface_template(size)],
            "landmarks": list(LANDMARK_NAMES), "coordinates": "pixel index (pixel i centred at i)"}
