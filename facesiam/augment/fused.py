"""The training augmentation of transforms.build_train_transform, fused for speed: the same random parameters,
one resampling instead of two, colour jitter as one colour matrix on uint8.

Reference (torchvision, PIL): flip -> RandomRotation (a bilinear warp of the whole image) -> RandomResizedCrop (a
second, antialiased resampling) -> ColorJitter (three PIL enhance passes) -> ToTensor -> Normalize.
Fused: the parameters are drawn with the very torchvision calls of the reference, in its order, from torch's RNG
(so a seeded sample, ``readers.apply_seeded``, draws the same flip, angle, crop and jitter factors as the
reference would, and exact resume is unchanged); then

- flip + rotation + crop + resize become one affine map, applied by one OpenCV ``warpAffine`` (bilinear) from
  the source pixels; when the crop is shrunk by 2x or more, the source is first reduced by an integer factor with
  area averaging (``cv2.INTER_AREA``), which stands in for the reference's antialiasing;
- brightness, contrast and saturation (PIL's ImageEnhance definitions, in the drawn order) compose into one 3x4
  colour matrix, applied by one ``cv2.transform`` on uint8 (the reference clips to 0..255 after each stage, this
  once at the end: images differ only where a stage saturates);
- the result stays uint8 (a CHW view of the HWC array; the DataLoader's collate does the one copy into the
  batch): the training step normalises the batch on its device (augment/batch.py), so the loader moves a
  quarter of the bytes. With ``augment_device`` cuda (or cpu) the workers stop after ``prepare`` (parameters,
  reduced source) and the warp and colour run on the whole batch on that device (augment/batch.py).

Hand-written on OpenCV because no library fuses these stages: torchvision.transforms.v2 and albumentations
still resample once per geometric stage. tests/augment/test_fused.py checks, per seed, that the fused
output matches the reference for the same drawn parameters, and that the two paths' image statistics agree.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from ..data.images import opencv as _cv2

GREY_WEIGHTS = np.array([0.299, 0.587, 0.114])  # PIL's "L" conversion (ITU-R 601-2), used by ImageEnhance
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range


class FusedTrainTransform:
    """PIL RGB image (or H x W x 3 uint8 RGB array) -> uint8 tensor 3 x size x size; once normalised (on the
    training device: batch_augment.ModelInput), the distribution of build_train_transform's torchvision reference."""

    def __init__(self, image_size: int, *, crop_scale: Optional[Sequence[float]], rotation: float, hflip: float,
                 color_jitter: float, center_crop: Optional[float]):
        self.size = int(image_size)
        self.crop_scale = tuple(crop_scale) if crop_scale else None
        self.rotation, self.hflip, self.color_jitter, self.center_crop = rotation, hflip, color_jitter, center_crop
        j = float(color_jitter)
        self._jitter = (max(0.0, 1 - j), 1 + j) if j else None
        _cv2()  # a missing OpenCV is an error when the transform is built, not in a loader worker

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, crop_scale={self.crop_scale}, rotation={self.rotation}, "
                f"hflip={self.hflip}, color_jitter={self.color_jitter}, center_crop={self.center_crop})")

    @property
    def draft_size(self) -> int:
        """Smallest JPEG decode (ShardDataset.draft_size) that still gives the smallest crop image_size pixels a
        side, so a reduced decode never lowers the resolution the network sees."""
        smallest = math.sqrt(self.crop_scale[0]) if self.crop_scale else 1.0
        return math.ceil(self.size / smallest / (self.center_crop or 1.0))

    # ------------------------------------------------------------------ parameters (the reference's draws)
    def sample(self, width: int, height: int) -> dict:
        """Draw flip, angle, crop and jitter exactly as the reference transforms would, from torch's RNG."""
        flip = bool(self.hflip) and bool(torch.rand(1) < self.hflip)
        angle = T.RandomRotation.get_params([-self.rotation, self.rotation]) if self.rotation else 0.0
        if self.crop_scale:
            dims = torch.empty((1, height, width), device="meta")  # get_params reads only the shape
            crop = T.RandomResizedCrop.get_params(dims, list(self.crop_scale), list(RATIO))
        else:
            crop = (0, 0, height, width)
        jitter = None
        if self._jitter:
            order, b, c, s, _ = T.ColorJitter.get_params(self._jitter, self._jitter, self._jitter, None)
            jitter = ([int(k) for k in order], b, c, s)
        return {"flip": flip, "angle": angle, "crop": crop, "jitter": jitter}

    # ------------------------------------------------------------------ the fused stages
    def geometry(self, width: int, height: int, params: dict) -> np.ndarray:
        """3x3 map from output pixel centres to source coordinates (continuous: pixel k spans [k, k+1))."""
        i, j, h, w = params["crop"]
        s = self.size
        crop = np.array([[w / s, 0, j], [0, h / s, i], [0, 0, 1]], np.float64)
        a = -math.radians(params["angle"])  # PIL's rotate: the inverse map, counter-clockwise angle
        cx, cy = width / 2.0, height / 2.0
        cos, sin = math.cos(a), math.sin(a)
        rotate = np.array([[cos, sin, cx - cos * cx - sin * cy], [-sin, cos, cy + sin * cx - cos * cy], [0, 0, 1]])
        flip = np.array([[-1, 0, width], [0, 1, 0], [0, 0, 1]], np.float64) if params["flip"] else np.eye(3)
        return flip @ rotate @ crop

    def colour_matrix(self, jitter, mean_rgb) -> np.ndarray:
        """3x4 matrix (RGB in 0..255) of brightness, contrast, saturation in the drawn order (PIL's definitions)."""
        m, o = np.eye(3), np.zeros(3)
        order, b, c, s = jitter
        for k in order:
            if k == 0:  # brightness: blend with black
                m, o = b * m, b * o
            elif k == 1:  # contrast: blend with the mean grey of the image as it is at this stage
                grey = int(float(GREY_WEIGHTS @ (m @ mean_rgb + o)) + 0.5)
                m, o = c * m, c * o + (1 - c) * grey
            elif k == 2:  # saturation: blend with the pixel's own grey
                mix = s * np.eye(3) + (1 - s) * np.outer(np.ones(3), GREY_WEIGHTS)
                m, o = mix @ m, mix @ o
        return np.hstack([m, o[:, None]])

    def prepare(self, img: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray, Optional[tuple]]:
        """Draw the parameters and reduce the source: (uint8 H x W x 3 source, 2x3 map from output pixel indices to
        source pixel indices, the drawn jitter or None). The half of the work that stays on the loader's CPU when
        the rest runs on the batch (augment/batch.py)."""
        cv2 = _cv2()
        if isinstance(img, np.ndarray):  # H x W x 3 uint8 RGB (images.decode_rgb_array: what the loader gives)
            src = img
        else:
            src = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
        height, width = src.shape[:2]
        if self.center_crop:  # F.center_crop's box, as a view: outside it the rotation fills black, as there
            side = max(1, round(self.center_crop * min(height, width)))
            top, left = int(round((height - side) / 2.0)), int(round((width - side) / 2.0))
            src = src[top:top + side, left:left + side]
            width = height = side
        params = self.sample(width, height)
        m = self.geometry(width, height, params)
        _, _, h, w = params["crop"]
        reduce = int(min(w, h) / self.size)  # >= 2: shrink the source first, by area averaging
        if reduce >= 2:
            src = cv2.resize(src, (src.shape[1] // reduce, src.shape[0] // reduce), interpolation=cv2.INTER_AREA)
            m = np.diag([1.0 / reduce, 1.0 / reduce, 1.0]) @ m
        # pixel-index coordinates (OpenCV samples at integer centres): index = continuous - 0.5
        to_index = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]]) @ m @ np.array([[1, 0, 0.5], [0, 1, 0.5],
                                                                                      [0, 0, 1]])
        return src, to_index[:2], params["jitter"]

    def __call__(self, img: Image.Image | np.ndarray) -> torch.Tensor:
        """uint8 tensor 3 x size x size (a view of the H x W x 3 result: the loader's collate makes the one copy);
        the training step normalises it on its device (batch_augment.normalise), a quarter of the bytes through
        the loader's queues, pinned memory and the host-to-device copy."""
        cv2 = _cv2()
        src, to_index, jitter = self.prepare(img)
        out = cv2.warpAffine(src, to_index, (self.size, self.size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        if jitter is not None:
            mean_rgb = np.asarray(cv2.mean(out)[:3]) if 1 in jitter[0] else np.zeros(3)
            out = cv2.transform(out, self.colour_matrix(jitter, mean_rgb))
        return torch.from_numpy(out).permute(2, 0, 1)
