"""Reading face data: ShardDataset (random access into shards), RecordDataset (insightface RecordIO),
ImageFolderDataset, open_dataset, build_stream.

The map-style datasets share one interface: ``len(ds)``, ``ds.labels`` (int64, no decoding), ``ds.classes``,
``ds.num_classes``, ``ds.paths`` (relative to the source ImageFolder), ``ds[i] -> (image, label)`` and
``ds[(i, aug_seed)]``, which runs the transform under a torch RNG seeded with ``aug_seed`` (state restored
afterwards): a sample's augmentation then depends only on (i, aug_seed), never on DataLoader worker count or
order, which is what makes training runs exactly reproducible and resumable. ``ds.__getitems__(keys)`` (what
torch's DataLoader calls for a whole batch) returns ``[ds[k] for k in keys]``; a ShardDataset at a URL fetches the
batch's bytes in parallel there (facesiam/data/remote.py).
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import Dataset

from .folder import list_image_folder
from .images import decode_rgb, decode_rgb_array, load_rgb
from ..errors import InputError
from .format import METADATA_FILE, load_index, read_metadata
from .remote import RemoteFolder, is_remote

Key = Union[int, tuple[int, int]]


def apply_seeded(transform: Callable, image: Any, seed: int) -> Any:
    """``transform(image)`` with torch's CPU RNG and Python's ``random`` seeded by ``seed``, then restored."""
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    try:
        torch.default_generator.manual_seed(seed)  # CPU only: never initialises CUDA in a loader worker
        random.seed(seed)  # for user transforms built on random (torchvision's use torch)
        return transform(image)
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)


class _FaceDataset(Dataset):
    """Shared key handling for the map-style datasets; subclasses provide labels, classes, paths and _image(i)."""

    transform: Optional[Callable]
    labels: np.ndarray
    classes: list[str]
    return_index: bool = False  # yield (image, dataset index) instead of (image, label): distillation's targets

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: Key):
        index, seed = self._key(key)
        return self._item(index, seed, self._image(index))

    def __getitems__(self, keys: list[Key]) -> list:
        """A batch: ``[self[k] for k in keys]`` (torch's DataLoader calls this for a batch when it exists)."""
        return [self[k] for k in keys]

    def _key(self, key: Key) -> tuple[int, Optional[int]]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return index % len(self), (None if seed is None else int(seed))

    def _item(self, index: int, seed: Optional[int], image: Any):
        if self.transform is not None:
            image = self.transform(image) if seed is None else apply_seeded(self.transform, image, seed)
        return image, (index if self.return_index else int(self.labels[index]))

    def _image(self, index: int):
        raise NotImplementedError


class ShardDataset(_FaceDataset):
    """Map-style dataset over one split of a shard folder written by ``write_shards`` / tools/make_shards.py.

    Samples are found through the split's byte-offset index (DST/index/<split>.npz, rebuilt from the tars if
    missing), so opening a dataset of millions of images reads one small file, and ``ds[i]`` is one pread.
    Shard files are opened lazily in each process (at most ``max_open_shards`` at once), and the dataset
    pickles without open handles, so it is safe in DataLoader worker processes. Use one dataset object per
    thread if you read from threads (the open-file cache is per object and not locked).

    ``root`` may be a URL (``s3://bucket/shards``, ``gs://...``, ``https://...``; fsspec's ``storage_options``
    or its FSSPEC_* environment variables): dataset.json and the index come from a local cache, ``ds[i]`` is one
    range request, and ``__getitems__`` fetches a batch's ranges in parallel while decoding what has arrived
    (facesiam/data/remote.py). ``self.root`` is then the URL (a str), else a Path.
    """

    max_open_shards = 128  # per process; well under the usual 1024 open files limit
    draft_size: Optional[int] = None  # decode JPEGs reduced while both sides stay >= this (images.decode_rgb)
    decode_array: bool = False  # decode to H x W x 3 uint8 arrays with OpenCV (images.decode_rgb_array), not PIL

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Optional[Callable] = None, *,
                 storage_options: Optional[dict] = None):
        self.remote = RemoteFolder(str(root), storage_options) if is_remote(root) else None
        self.root: Union[Path, str] = self.remote.url if self.remote else Path(root)
        self.split = split
        self.transform = transform
        meta = read_metadata(self.remote or self.root)
        if split not in meta["splits"]:
            raise InputError(f"{self.root}/{METADATA_FILE} has no split {split!r} (it has {', '.join(sorted(meta['splits']))}); "
                             f"pass --split with one of those, or make shards with --val-identities for a 'val' split")
        self.classes: list[str] = list(meta["classes"])
        self._index = load_index(self.remote or self.root, split, meta["splits"][split]["shards"])
        self.labels: np.ndarray = self._index.label
        self._shard_paths = [f"{self.root}/{name}" if self.remote else str(self.root / name)
                             for name in self._index.shards]
        self._paths: Optional[list[str]] = None
        self._files: OrderedDict[int, int] = OrderedDict()  # shard number -> fd, least recently used first
        self._pid = os.getpid()

    @property
    def paths(self) -> list[str]:
        if self._paths is None:  # decoded on first use: millions of strings are not free
            self._paths = self._index.paths()
        return self._paths

    def read_bytes(self, index: int) -> bytes:
        """The stored image bytes of sample ``index`` (JPEG, PNG or WebP), without decoding."""
        shard, offset, size = int(self._index.shard[index]), int(self._index.offset[index]), int(self._index.size[index])
        if self.remote is not None:
            return self.remote.read(self._index.shards[shard], offset, size)
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise OSError(f"{self._shard_paths[shard]}: short read at byte {offset} (shard truncated?); "
                          f"rebuild the shards with tools/make_shards.py")
        return data

    def iter_bytes(self, indices: list[int]):
        """(position in ``indices``, image bytes) for every index: at a URL in parallel, in arrival order;
        locally one pread each, in order."""
        if self.remote is None:
            yield from ((k, self.read_bytes(i)) for k, i in enumerate(indices))
            return
        ix = self._index
        yield from self.remote.read_many([(ix.shards[int(ix.shard[i])], int(ix.offset[i]), int(ix.size[i]))
                                          for i in indices])

    def __getitems__(self, keys: list[Key]) -> list:
        """A batch. At a URL its byte ranges are fetched in parallel and each image decoded as it arrives."""
        if self.remote is None:
            return [self[k] for k in keys]
        parsed = [self._key(k) for k in keys]
        out: list = [None] * len(parsed)
        for k, raw in self.iter_bytes([index for index, _ in parsed]):
            out[k] = self._item(parsed[k][0], parsed[k][1], self._decode(raw))
        return out

    def _image(self, index: int):
        return self._decode(self.read_bytes(index))

    def _decode(self, raw: bytes):
        return decode_rgb_array(raw, self.draft_size) if self.decode_array else decode_rgb(raw, self.draft_size)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked into a worker: the parent's descriptors are not ours to share
            self._close_all()
            self._pid = os.getpid()
        fd = self._files.get(shard)
        if fd is None:
            if len(self._files) >= self.max_open_shards:
                os.close(self._files.popitem(last=False)[1])
            fd = os.open(self._shard_paths[shard], os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._files[shard] = fd
        else:
            self._files.move_to_end(shard)
        return fd

    def _close_all(self) -> None:
        for fd in self._files.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._files.clear()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        state["_paths"] = None
        return state

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            self._close_all()

    def __repr__(self) -> str:
        return (f"ShardDataset({str(self.root)!r}, split={self.split!r}: {len(self):,} images, "
                f"{len(np.unique(self.labels)):,} of {self.num_classes:,} identities)")


class ImageFolderDataset(_FaceDataset):
    """Map-style dataset over a plain ImageFolder (torchvision's label rule), with ShardDataset's interface.

    Images are read under the shards' policy (EXIF orientation applied, 16-bit and alpha handled), so a folder
    and its shards give the same pixels. A broken file raises an error naming it when it is read; pack the
    folder with tools/make_shards.py to find and skip all broken files up front.
    """

    def __init__(self, root: str | os.PathLike, transform: Optional[Callable] = None):
        self.root = Path(root)
        self.transform = transform
        listing = list_image_folder(self.root)
        if not listing.samples:
            raise FileNotFoundError(f"{self.root} holds no images in identity sub-folders (SRC/<identity>/<image>)")
        self.classes: list[str] = listing.classes
        self.paths: list[str] = [rel for rel, _ in listing.samples]
        self.labels: np.ndarray = np.asarray([label for _, label in listing.samples], np.int64)

    def _image(self, index: int):
        return load_rgb(self.root / self.paths[index])

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}: {len(self):,} images, {self.num_classes:,} identities)"


class RecordDataset(_FaceDataset):
    """Map-style dataset over an insightface RecordIO folder (train.rec + train.idx + property; facesiam/data/
    recordio.py), with ShardDataset's interface: ``ds[i]`` is one read through the .idx, ``ds.labels`` come from
    the record headers (header 0's identity ranges when present) without decoding any image. A .rec holds one
    split, "train". Pickles without its open file, so it is safe in DataLoader workers."""

    draft_size: Optional[int] = None  # as ShardDataset's
    decode_array: bool = False
    _decode = ShardDataset._decode

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Optional[Callable] = None):
        from .recordio import RecordFile

        if split != "train":
            raise InputError(f"{root} is RecordIO data, which holds one split, 'train' (not {split!r}): validate on "
                             f"verification sets (.bin), or make shards with --val-identities for a 'val' split")
        self.root, self.split, self.transform = Path(root), split, transform
        self.record = RecordFile(root)
        self.keys: np.ndarray = self.record.image_keys
        self.labels: np.ndarray = self.record.labels
        self.classes: list[str] = self.record.classes
        self._paths: Optional[list[str]] = None

    @property
    def paths(self) -> list[str]:
        if self._paths is None:
            self._paths = [f"{self.record.path.name}#{k}" for k in self.keys.tolist()]
        return self._paths

    def read_bytes(self, index: int) -> bytes:
        """The stored image bytes of sample ``index``, without decoding."""
        return self.record.read_sample(int(self.keys[index]))[1]

    def _image(self, index: int):
        return self._decode(self.read_bytes(index))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_paths"] = None
        return state

    def __repr__(self) -> str:
        return (f"RecordDataset({str(self.record.path)!r}: {len(self):,} images, "
                f"{len(np.unique(self.labels)):,} of {self.num_classes:,} identities)")


def open_dataset(path: str | os.PathLike, split: str = "train",
                 transform: Optional[Callable] = None) -> Union[ShardDataset, RecordDataset, ImageFolderDataset]:
    """ShardDataset when ``path`` holds dataset.json or is a URL (s3://, gs://, https://: shards there),
    RecordDataset for a RecordIO folder (train.rec + train.idx), else ImageFolderDataset (a whole folder; ``split``
    unused)."""
    from .recordio import is_record_folder

    if is_remote(path) or (Path(path) / METADATA_FILE).is_file():
        return ShardDataset(path, split, transform)
    if is_record_folder(path):
        return RecordDataset(path, split, transform)
    return ImageFolderDataset(path, transform)


class _StreamSample:
    """Pipeline stage: (PIL image, label, json) -> (transform(image), label, path). A class so it pickles."""

    def __init__(self, transform: Optional[Callable]):
        self.transform = transform

    def __call__(self, sample):
        image, label, meta = sample
        return (image if self.transform is None else self.transform(image)), int(label), meta["path"]


def build_stream(root: str | os.PathLike, split: str = "train", transform: Optional[Callable] = None, *,
                 shuffle: int = 0, seed: int = 0, epoch: int = 0,
                 handler: Callable[[Exception], bool] = wds.reraise_exception) -> wds.DataPipeline:
    """WebDataset pipeline over a split's shards yielding (image, label, path), for sequential passes.

    Shards are split across distributed ranks (``split_by_node``) and DataLoader workers
    (``split_by_worker``); with one rank and one worker the order is the split's index order. ``shuffle`` > 0
    shuffles shards and samples (buffer of that many samples) deterministically in (seed, epoch).
    ``pipeline.pipeline`` is the list of stages, to inspect or extend.
    """
    root = Path(root)
    meta = read_metadata(root)
    if split not in meta["splits"]:
        raise KeyError(f"{root} has no split {split!r}; it has {sorted(meta['splits'])}")
    urls = [str(root / name) for name in meta["splits"][split]["shards"]]
    stages: list[Any] = [wds.SimpleShardList(urls)]
    if shuffle:
        stages.append(wds.detshuffle(bufsize=max(1, len(urls)), initial=max(1, len(urls)), seed=seed, epoch=epoch - 1))
    stages += [wds.split_by_node, wds.split_by_worker, wds.tarfile_to_samples(handler=handler)]
    if shuffle:
        stages.append(wds.detshuffle(bufsize=shuffle, initial=shuffle, seed=seed, epoch=epoch - 1))
    stages += [wds.decode("pil", handler=handler), wds.to_tuple("jpg;png;webp", "cls", "json", handler=handler),
               wds.map(_StreamSample(transform), handler=handler)]
    return wds.DataPipeline(*stages)
