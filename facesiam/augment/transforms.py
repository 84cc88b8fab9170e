"""Image transforms for training and evaluation (torchvision), with the seed article's recipe as defaults.

Train: [centre crop] -> RandomHorizontalFlip -> RandomRotation(±15°) -> RandomResizedCrop(size, 0.8-1.0)
-> ColorJitter(0.2, 0.2, 0.2) -> ToTensor -> Normalize. Eval: [centre crop] -> Resize((size, size)) ->
ToTensor -> Normalize. A value of 0 (or None) disables a train stage. The optional centre crop keeps a
fraction of the shorter side around the centre before anything else (LFW: the face is the middle ~0.6 of
the 250 px image), so training and evaluation see the same region.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from ..errors import InputError

# -----------------------------------------------------------------------------
# defaults: the seed article's recipe (ImageNet normalisation, as its pretrained trunk expects)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.8, 1.0)
ROTATION = 15.0
HFLIP = 0.5
COLOR_JITTER = 0.2
# -----------------------------------------------------------------------------


class CenterCropFraction(torch.nn.Module):
    """Keep the central square whose side is ``fraction`` of the image's shorter side (PIL image or tensor)."""

    def __init__(self, fraction: float):
        super().__init__()
        if not 0 < fraction <= 1:
            raise InputError(f"center_crop must be a fraction in (0, 1], got {fraction}")
        self.fraction = fraction

    def forward(self, img):
        _, height, width = F.get_dimensions(img)
        side = max(1, round(self.fraction * min(height, width)))
        return F.center_crop(img, [side, side])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fraction={self.fraction})"


def _check_size(image_size: int) -> None:
    if int(image_size) < 1:
        raise InputError(f"image_size must be >= 1 pixel, got {image_size}")


def build_train_transform(image_size: int, *, crop_scale: Optional[Sequence[float]] = CROP_SCALE,
                          rotation: float = ROTATION, hflip: float = HFLIP, color_jitter: float = COLOR_JITTER,
                          center_crop: Optional[float] = None, mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = IMAGENET_STD, implementation: str = "torchvision") -> Callable:
    """PIL image -> normalised float tensor 3 x image_size x image_size, randomly augmented ("fused": a uint8
    tensor that the training step normalises with ``mean``/``std`` on its device, batch_augment.ModelInput).

    crop_scale: RandomResizedCrop area range; None or 0 resizes the whole image instead.
    rotation: RandomRotation range in degrees (±); hflip: flip probability; color_jitter: brightness, contrast
    and saturation strength. 0 disables each. center_crop: see CenterCropFraction; None keeps the whole image.
    implementation: "torchvision" (these stages) or "fused" (augment/fused.py: the same parameters,
    one warp and one colour matrix).
    """
    _check_size(image_size)
    if rotation < 0 or color_jitter < 0 or not 0 <= hflip <= 1:
        raise InputError(f"need rotation >= 0, color_jitter >= 0 and 0 <= hflip <= 1; "
                         f"got {rotation}, {color_jitter}, {hflip}")
    if crop_scale and not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise InputError(f"crop_scale must satisfy 0 < low <= high <= 1, got {tuple(crop_scale)}")
    if center_crop and not 0 < center_crop <= 1:
        raise InputError(f"center_crop must be a fraction in (0, 1], got {center_crop}")
    if implementation == "fused":
        from .fused import FusedTrainTransform

        return FusedTrainTransform(image_size, crop_scale=crop_scale or None, rotation=rotation, hflip=hflip,
                                   color_jitter=color_jitter, center_crop=center_crop)
    if implementation != "torchvision":
        raise InputError(f"augment implementation must be torchvision or fused, got {implementation!r}")
    stages: list[Callable] = []
    if center_crop:
        stages.append(CenterCropFraction(center_crop))
    if hflip:
        stages.append(T.RandomHorizontalFlip(hflip))
    if rotation:
        # bilinear rather than torchvision's default nearest: nearest leaves jagged edges a network can learn
        stages.append(T.RandomRotation(rotation, interpolation=InterpolationMode.BILINEAR))
    if crop_scale:
        stages.append(T.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True))
    else:
        stages.append(T.Resize((image_size, image_size), antialias=True))
    if color_jitter:
        stages.append(T.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    stages += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(stages)


def build_eval_transform(image_size: int, *, center_crop: Optional[float] = None,
                         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Callable:
    """PIL image -> normalised float tensor 3 x image_size x image_size: [centre crop], resize, normalise."""
    _check_size(image_size)
    stages: list[Callable] = [CenterCropFraction(center_crop)] if center_crop else []
    stages += [T.Resize((image_size, image_size), antialias=True), T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(stages)
