"""The device half of the training data path: what happens to a batch between the loader and the model.

The loader's workers ship uint8 (a quarter of the bytes of float32 through the worker queues, pinned memory and
the host-to-device copy); ``ModelInput`` moves a batch to the training device and normalises it there. Three
kinds of batch come out of the loader:

* float tensors (``augment_implementation: torchvision``: the reference, normalised in the workers) - moved;
* uint8 tensors (``fused``, the default: augmented in the workers) - moved, then normalised;
* an ``AugmentBatch`` (``augment_device: cuda`` or ``cpu``): the workers only decode, draw each sample's
  parameters (seeded per sample exactly as the fused path: the same flip, angle, crop and jitter) and reduce
  large sources; ``BatchAugment`` then warps the whole batch with one ``grid_sample`` (flip + rotation + crop +
  resize as one affine map, bilinear, black outside the image: the fused path's ``warpAffine``) and applies each
  sample's colour matrix (brightness, contrast, saturation in its drawn order, PIL's definitions), on that
  device. Same code on CUDA and CPU; the parameters come from the per-sample seed, and the device ops are
  deterministic, so a resumed run continues bit-exactly (on one device type).

Hand-written for the same reason as fused_transforms.py: the batch libraries (kornia, torchvision.transforms.v2
on batches) draw one set of parameters per batch or from their own RNG, not the per-sample seeded draws that make
resume exact, and resample once per geometric stage.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from ..errors import InputError
from .fused import GREY_WEIGHTS, FusedTrainTransform

AUGMENT_DEVICES = ("loader", "cuda", "cpu")


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (or 0..255 float) N x 3 x H x W -> float32 (x / 255 - mean) / std, on the images' device."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=images.device).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], device=images.device).view(1, 3, 1, 1)
    return torch.addcmul(-shift, images.float(), scale)


class DeferredImage(NamedTuple):
    """One sample as the workers leave it for the batch: the reduced source and its drawn parameters."""

    source: np.ndarray          # uint8 H x W x 3
    to_index: np.ndarray        # 2 x 3: output pixel index -> source pixel index
    colour: np.ndarray          # float32 [order (4 stage indices), brightness, contrast, saturation, enabled]


class DeferredTrainTransform:
    """Loader-side half of the fused augmentation: PIL image -> DeferredImage (parameters drawn from torch's RNG,
    so ``readers.apply_seeded`` seeds them per sample)."""

    def __init__(self, fused: FusedTrainTransform):
        self.fused = fused

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fused!r})"

    def __call__(self, img) -> DeferredImage:
        source, to_index, jitter = self.fused.prepare(img)
        colour = np.zeros(8, np.float32)
        if jitter is not None:
            order, b, c, s = jitter
            colour[:4] = order
            colour[4:] = (b, c, s, 1.0)
        return DeferredImage(source, to_index, colour)


class AugmentBatch:
    """A collated batch of DeferredImages: sources zero-padded to the largest (B x H x W x 3 uint8), the affine
    maps in grid_sample's normalised coordinates of that padded size (B x 2 x 3), colour parameters (B x 8)."""

    def __init__(self, sources: torch.Tensor, theta: torch.Tensor, colour: torch.Tensor):
        self.sources, self.theta, self.colour = sources, theta, colour

    def __len__(self) -> int:
        return len(self.sources)

    def pin_memory(self) -> "AugmentBatch":  # DataLoader(pin_memory=True) calls this
        return AugmentBatch(self.sources.pin_memory(), self.theta.pin_memory(), self.colour.pin_memory())

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "AugmentBatch":
        return AugmentBatch(*(t.to(device, non_blocking=non_blocking) for t in (self.sources, self.theta,
                                                                              self.colour)))


def collate(samples: list) -> Any:
    """The loader's collate: (DeferredImage, label) samples -> (AugmentBatch, labels); (3 x H x W views of H x W x 3
    arrays, label) -> a channels-last N x 3 x H x W batch, stacked as the contiguous H x W x 3 rows they are (16x
    faster than gathering them into NCHW: 0.22 -> 0.014 ms per 224 px image); anything else: PyTorch's
    default_collate (which, in a worker, stacks straight into shared memory)."""
    first = samples[0][0] if samples else None
    if isinstance(first, torch.Tensor) and first.dim() == 3 and first.shape[0] == 3 and first.stride(0) == 1:
        images, labels = default_collate([(s[0].permute(1, 2, 0), s[1]) for s in samples])
        return images.permute(0, 3, 1, 2), labels
    if not isinstance(first, DeferredImage):
        return default_collate(samples)
    images = [s[0] for s in samples]
    height = max(d.source.shape[0] for d in images)
    width = max(d.source.shape[1] for d in images)
    sources = np.zeros((len(images), height, width, 3), np.uint8)
    maps = np.zeros((len(images), 3, 3))
    maps[:, 2, 2] = 1.0
    for k, d in enumerate(images):
        h, w = d.source.shape[:2]
        sources[k, :h, :w] = d.source
        maps[k, :2] = d.to_index
    # grid_sample (align_corners=False) reads source pixel index i at normalised (2 i + 1) / W - 1 of the padded
    # size; the output side (index <- normalised) is applied in BatchAugment, which knows the output size.
    to_norm = np.array([[2.0 / width, 0, 1.0 / width - 1], [0, 2.0 / height, 1.0 / height - 1]])
    theta = to_norm @ maps  # B x 2 x 3: output pixel index -> normalised source coordinate
    labels = default_collate([s[1] for s in samples])
    return AugmentBatch(torch.from_numpy(sources), torch.from_numpy(theta.astype(np.float32)),
                        torch.from_numpy(np.stack([d.colour for d in images]))), labels


class BatchAugment:
    """The random geometry and colour of the fused augmentation on a whole AugmentBatch, on its device."""

    def __init__(self, size: int):
        self.size = int(size)
        s = self.size
        # output pixel index of grid_sample's normalised output coordinate x: index = (x + 1) * S / 2 - 1/2
        self._from_output = torch.tensor([[s / 2.0, 0, (s - 1) / 2.0], [0, s / 2.0, (s - 1) / 2.0], [0, 0, 1]],
                                         dtype=torch.float64)

    def __call__(self, batch: AugmentBatch) -> torch.Tensor:
        """-> float B x 3 x size x size in 0..255 (not normalised)."""
        dev = batch.sources.device
        theta = (batch.theta.double() @ self._from_output.to(dev)).float()
        grid = F.affine_grid(theta, [len(batch), 3, self.size, self.size], align_corners=False)
        src = batch.sources.permute(0, 3, 1, 2).float()
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return self.colour(out, batch.colour)

    @staticmethod
    def colour(images: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
        """Per-sample 3x4 colour matrices (FusedTrainTransform.colour_matrix, batched), applied, clipped once."""
        dev, b_count = images.device, len(images)
        grey_w = torch.tensor(GREY_WEIGHTS, dtype=torch.float32, device=dev)
        eye = torch.eye(3, device=dev).expand(b_count, 3, 3)
        m, o = eye.clone(), torch.zeros(b_count, 3, device=dev)
        bright, contrast, sat = colour[:, 4], colour[:, 5], colour[:, 6]
        mean_rgb = images.mean((2, 3))  # of the warped image, black border included (cv2.mean's)
        mix = sat.view(-1, 1, 1) * eye + (1 - sat).view(-1, 1, 1) * grey_w.expand(3, 3)
        for k in range(4):  # the drawn order; index 3 (hue) is never drawn: identity
            op = colour[:, k].view(-1, 1)
            # brightness: blend with black
            mb, ob = m * bright.view(-1, 1, 1), o * bright.view(-1, 1)
            # contrast: blend with the image's mean grey as it is at this stage (PIL rounds it to an integer)
            grey = torch.floor((torch.einsum("bij,bj->bi", m, mean_rgb) + o) @ grey_w + 0.5)
            mc, oc = m * contrast.view(-1, 1, 1), o * contrast.view(-1, 1) + ((1 - contrast) * grey).view(-1, 1)
            # saturation: blend with the pixel's own grey
            ms, os_ = mix @ m, torch.einsum("bij,bj->bi", mix, o)
            m = torch.where((op == 0).unsqueeze(-1), mb, torch.where((op == 1).unsqueeze(-1), mc,
                            torch.where((op == 2).unsqueeze(-1), ms, m)))
            o = torch.where(op == 0, ob, torch.where(op == 1, oc, torch.where(op == 2, os_, o)))
        enabled = colour[:, 7].view(-1, 1) > 0
        m = torch.where(enabled.unsqueeze(-1), m, eye)
        o = torch.where(enabled, o, 0.0)
        out = torch.einsum("bij,bjhw->bihw", m, images) + o.view(-1, 3, 1, 1)
        return out.clamp_(0.0, 255.0)


class ModelInput:
    """Loader batch -> the model's input on ``device``: moved, augmented (AugmentBatch), normalised, channels-last.

    augment_device: where an AugmentBatch is augmented ("cuda": the training GPU; "cpu": the same code in the
    training process); other batches are finished on ``device``.
    """

    def __init__(self, device: torch.device, *, mean: Sequence[float], std: Sequence[float],
                 image_size: Optional[int] = None, augment_device: str = "loader", channels_last: bool = False):
        if augment_device not in AUGMENT_DEVICES:
            raise InputError(f"augment_device must be one of {', '.join(AUGMENT_DEVICES)}, got {augment_device!r}")
        if augment_device == "cuda" and torch.device(device).type != "cuda":
            raise InputError("augment_device cuda needs a CUDA training device (none here); --augment-device cpu "
                             "runs the same batched augmentation on the CPU, --augment-device loader (the default) "
                             "in the loader workers")
        self.device = torch.device(device)
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment_device = torch.device(augment_device) if augment_device != "loader" else self.device
        self.augment = BatchAugment(image_size) if augment_device != "loader" else None
        self.channels_last = channels_last

    def __call__(self, images: Union[torch.Tensor, AugmentBatch]) -> torch.Tensor:
        if isinstance(images, AugmentBatch):
            if self.augment is None:
                raise InputError("an AugmentBatch reached a ModelInput built with augment_device loader")
            x = self.augment(images.to(self.augment_device, non_blocking=True))
            x = normalise(x, self.mean, self.std).to(self.device, non_blocking=True)
        else:
            x = images.to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:
                x = normalise(x, self.mean, self.std)
        # the fused loader's batches arrive channels-last already (collate): free when the model wants that layout
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
