"""Face data: the shard format, its writer and readers, transforms, the per-class sampler, synthetic faces."""

from .readers import ImageFolderDataset, ShardDataset, apply_seeded, build_stream, open_dataset
from .sampler import DistributedPerClassSampler
from .synthetic import make_synthetic_faces
from .transforms import build_eval_transform, build_train_transform
from .writer import write_shards

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
