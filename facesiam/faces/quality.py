"""Face image quality: how usable a face crop is for recognition (the doctor's blur check, the service's /detect).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def sharpness(image: Image.Image, size: int) -> float:
    """Variance of the Laplacian (OpenCV, 3x3 aperture) of the grey image resized to ``size`` x ``size``.

    The classic focus measure (Pech-Pacheco et al. 2000): blur removes the high frequencies the Laplacian
    responds to. Measured on what the model sees (the aligned crop at its input size), so one threshold fits
    every photo whatever its original resolution.
    """
    import cv2

    grey = np.asarray(image.convert("L").resize((size, size), Image.BILINEAR), np.float32)
    return float(cv2.Laplacian(grey, cv2.CV_32F, ksize=1).var())
