"""Data: the shard format, its writer and readers, image decoding, ImageFolder listing, the per-class sampler.

The names below are imported on first use (PEP 562), so that `facesiam.data.images` (PIL and numpy only) can be
used without importing torch: the onnxruntime inference path (facesiam/onnx_runtime.py) depends on it.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "ShardDataset": "readers",
    "ImageFolderDataset": "readers",
    "RecordDataset": "readers",
    "RecordFile": "recordio",
    "write_rec": "recordio",
    "open_dataset": "readers",
    "build_stream": "readers",
    "apply_seeded": "readers",
    "write_shards": "writer",
    "DistributedPerClassSampler": "sampler",
}

__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
