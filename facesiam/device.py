"""The one place that decides which torch device a command, an evaluation or a training run uses."""

from __future__ import annotations

from typing import Union

import torch

from .errors import InputError


def resolve_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """None or "auto": CUDA when torch sees a GPU, else CPU; anything else is taken as asked.

    An explicit CUDA device without a visible GPU is an InputError (one line naming the fix) rather than torch's
    multi-line error from deep inside the first tensor copy.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(device)!r} requested but torch sees no CUDA GPU; use --device cpu")
    return resolved
