"""Face data: shard writing (make_shards), random-access and streaming readers, transforms, sampler, synthetic faces."""

from .datasets import ImageFolderDataset, ShardDataset, apply_seeded, build_stream, open_dataset
from .sampler import DistributedPerClassSampler
from .shards import write_shards
from .synthetic import make_synthetic_faces
from .transforms import build_eval_transform, build_train_transform

__all__ = [
    "ShardDataset",
    "ImageFolderDataset",
    "open_dataset",
    "build_stream",
    "apply_seeded",
    "write_shards",
    "build_train_transform",
    "build_eval_transform",
    "make_synthetic_faces",
    "DistributedPerClassSampler",
]
