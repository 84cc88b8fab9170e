"""What the score pass and the gallery's exact search share: embeddings as unit float32 tensors, a progress bar."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from ..device import resolve_device
from ..errors import InputError

Array = Union[np.ndarray, torch.Tensor]


def normalize(embeddings: Array, device: Union[str, torch.device, None] = None, *,
              normalized: bool = False) -> torch.Tensor:
    """float32 tensor on ``device`` with L2-normalised rows (cosine = dot product).

    ``normalized=True`` trusts the rows to be unit length already and avoids a copy when dtype and device fit
    (a NumPy float32 array on CPU is wrapped, not copied: galleries of 10^6 x 512 stay single).
    """
    x = embeddings if isinstance(embeddings, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(embeddings))
    x = x.to(device=resolve_device(device) if device is not None else x.device, dtype=torch.float32)
    if x.ndim != 2:
        raise InputError(f"embeddings must be an N x D matrix, got shape {tuple(x.shape)}")
    return x if normalized else F.normalize(x, dim=1)


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "it"):
    """A tqdm bar (a no-op when not ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False)
