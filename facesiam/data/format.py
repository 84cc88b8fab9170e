"""The shard format on disk: dataset.json, the per-split byte-offset index, and reading both.

Layout of a shard folder (written by facesiam.data.writer.write_shards / tools/make_shards.py)::

    train-000000.tar ...      WebDataset shards; per sample: KEY.jpg|png|webp, KEY.cls, KEY.json
    val-000000.tar ...        only with --val-identities (whole identities held out, seeded)
    index/train.npz ...       per sample: shard, byte offset and size of the image member, label, path
    dataset.json              classes, splits, counts, options, skipped files (written last)

The folder may also be a URL (``s3://``, ``gs://``, ``https://``): ``read_metadata`` and ``load_index`` then read
cached copies of dataset.json and the index (facesiam/data/remote.py); the index is never rebuilt remotely.

* Labels follow torchvision's ImageFolder (sorted identity folders); all splits share that label space.
* ``KEY`` is ``<label>_<n>`` (ASCII, no dot: WebDataset splits key and extension at the first dot);
  ``KEY.json`` is ``{"path": <path relative to SRC>, "identity": <name>, "label": <int>}`` (UTF-8), so
  ``webdataset.WebDataset(urls).decode("pil").to_tuple("jpg;png;webp", "cls", "json")`` reads every sample.
"""

from __future__ import annotations

import array
import json
import os
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError, and_more
from ..fileio import atomic_write
from .remote import RemoteFolder, is_remote

SHARD_FORMAT = "facesiam-shards"
SHARD_FORMAT_VERSION = 1
METADATA_FILE = "dataset.json"
INDEX_DIR = "index"
IMAGE_EXTS = ("jpg", "png", "webp")  # the only image member extensions written (see images.PASS_THROUGH)


@dataclass
class ShardIndex:
    """Where each sample of one split lives: shard number, byte offset and size of its image member."""

    shards: list[str]  # shard file names (relative to the dataset root)
    shard_bytes: np.ndarray  # int64 size of each shard file, to notice a stale index
    shard: np.ndarray  # int32 per sample
    offset: np.ndarray  # int64 per sample: first byte of the image member's data
    size: np.ndarray  # int64 per sample: its length
    label: np.ndarray  # int64 per sample
    path_utf8: np.ndarray  # uint8: all relative paths, UTF-8, concatenated (compact for millions of samples)
    path_end: np.ndarray  # int64 per sample: end of its path in path_utf8

    def __len__(self) -> int:
        return len(self.label)

    def paths(self) -> list[str]:
        blob, ends = self.path_utf8.tobytes(), self.path_end.tolist()
        return [blob[s:e].decode("utf-8") for s, e in zip([0] + ends[:-1], ends)]

    def save(self, path: Path) -> None:
        """Write an .npz atomically and reproducibly (numpy's savez stamps the current time into the zip)."""
        arrays = {"shards": np.asarray(self.shards, dtype=str), "shard_bytes": self.shard_bytes,
                  "shard": self.shard, "offset": self.offset, "size": self.size, "label": self.label,
                  "path_utf8": self.path_utf8, "path_end": self.path_end}
        with atomic_write(path, "wb") as out, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
            for name, values in arrays.items():
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(values), allow_pickle=False)

    @classmethod
    def load(cls, path: Path) -> "ShardIndex":
        with np.load(path, allow_pickle=False) as z:
            return cls(shards=[str(s) for s in z["shards"]], shard_bytes=z["shard_bytes"], shard=z["shard"],
                       offset=z["offset"], size=z["size"], label=z["label"], path_utf8=z["path_utf8"],
                       path_end=z["path_end"])


class IndexBuilder:
    """Collects index entries compactly (typed arrays, ~40 bytes + path per sample) for millions of samples."""

    def __init__(self):
        self.shard, self.label = array.array("i"), array.array("q")
        self.offset, self.size, self.path_end = array.array("q"), array.array("q"), array.array("q")
        self.paths = bytearray()

    def add(self, shard: int, offset: int, size: int, label: int, path: str) -> None:
        self.shard.append(shard)
        self.offset.append(offset)
        self.size.append(size)
        self.label.append(label)
        self.paths += path.encode("utf-8")
        self.path_end.append(len(self.paths))

    def extend(self, shard: int, offsets: np.ndarray, sizes: np.ndarray, labels: Sequence[int],
               paths: Sequence[str]) -> None:
        """``add`` for many samples of one shard (the shard writer's add_many)."""
        encoded = [p.encode("utf-8") for p in paths]
        self.shard.extend([shard] * len(encoded))
        self.offset.extend(np.asarray(offsets, np.int64).tolist())
        self.size.extend(np.asarray(sizes, np.int64).tolist())
        self.label.extend(int(v) for v in labels)
        self.path_end.extend((len(self.paths) + np.cumsum([len(e) for e in encoded], dtype=np.int64)).tolist())
        self.paths += b"".join(encoded)

    def build(self, shards: list[str], shard_bytes: list[int]) -> ShardIndex:
        def arr(a, dtype):
            return np.frombuffer(a, dtype).copy() if len(a) else np.zeros(0, dtype)
        return ShardIndex(shards=list(shards), shard_bytes=np.asarray(shard_bytes, np.int64),
                          shard=arr(self.shard, np.int32), offset=arr(self.offset, np.int64),
                          size=arr(self.size, np.int64), label=arr(self.label, np.int64),
                          path_utf8=arr(bytes(self.paths), np.uint8), path_end=arr(self.path_end, np.int64))


def index_path(root: Path, split: str) -> Path:
    return Path(root) / INDEX_DIR / f"{split}.npz"


def scan_shards(root: str | os.PathLike, shards: list[str]) -> ShardIndex:
    """Build a split's index by reading the tar headers (and the small cls/json members) of its shards."""
    root = Path(root)
    builder = IndexBuilder()
    for number, name in enumerate(shards):
        samples: dict[str, dict[str, Any]] = {}
        with tarfile.open(root / name, "r:") as tar:
            for member in tar:
                if not member.isfile() or "." not in member.name:
                    continue
                key, ext = member.name.split(".", 1)
                sample = samples.setdefault(key, {})
                if ext in IMAGE_EXTS:
                    sample["image"] = (member.offset_data, member.size)
                elif ext == "json":
                    sample["meta"] = json.loads(tar.extractfile(member).read().decode("utf-8"))
        for key, sample in samples.items():  # dicts keep insertion (= tar) order
            if "image" not in sample or "meta" not in sample:
                raise InputError(f"{root / name}: sample {key!r} lacks an image or json member; "
                                 f"rebuild the shards with tools/make_shards.py")
            offset, size = sample["image"]
            builder.add(number, offset, size, int(sample["meta"]["label"]), sample["meta"]["path"])
    sizes = [(root / name).stat().st_size for name in shards]
    return builder.build(shards, sizes)


def load_index(root: str | os.PathLike | RemoteFolder, split: str, shards: list[str]) -> ShardIndex:
    """The split's offset index; rebuilt from the tars (and saved when possible) if missing or stale. At a URL
    (a RemoteFolder) it is read from the local cache and checked against the tars' sizes, never rebuilt."""
    if isinstance(root, RemoteFolder) or is_remote(root):
        return _load_remote_index(root if isinstance(root, RemoteFolder) else RemoteFolder(root), split, shards)
    root = Path(root)
    path = index_path(root, split)
    if path.is_file():
        index = ShardIndex.load(path)
        sizes = [(root / name).stat().st_size for name in shards]
        if index.shards == list(shards) and index.shard_bytes.tolist() == sizes:
            return index
        reason = "does not match the shards"
    else:
        reason = "is missing"
    print(f"facesiam: index {path} {reason}; rebuilding it from {len(shards)} shard(s)", file=sys.stderr)
    index = scan_shards(root, shards)
    try:
        path.parent.mkdir(exist_ok=True)
        index.save(path)
    except OSError as e:  # read-only dataset: use the rebuilt index in memory
        print(f"facesiam: cannot save the rebuilt index ({e}); it will be rebuilt at every start", file=sys.stderr)
    return index


def _load_remote_index(folder: RemoteFolder, split: str, shards: list[str]) -> ShardIndex:
    again = f"make the shards again with tools/make_shards.py SRC {folder.url} --overwrite"
    index = ShardIndex.load(folder.cached(f"{INDEX_DIR}/{split}.npz", f"the index is not rebuilt remotely: {again}"))
    sizes = folder.sizes(shards)
    missing = [name for name in shards if sizes.get(name) is None]
    if missing:
        raise InputError(f"{folder.url_of(missing[0])} not found{and_more(missing)}: the shard set is incomplete; "
                         f"{again}")
    if index.shards != list(shards) or index.shard_bytes.tolist() != [sizes[name] for name in shards]:
        raise InputError(f"{folder.url_of(INDEX_DIR + '/' + split + '.npz')} does not match the shards (they changed "
                         f"after it was written); {again}")
    return index


def read_metadata(root: str | os.PathLike | RemoteFolder) -> dict:
    """dataset.json of a shard folder (local, or a URL / RemoteFolder: through the local cache)."""
    if isinstance(root, RemoteFolder) or is_remote(root):
        folder = root if isinstance(root, RemoteFolder) else RemoteFolder(root)
        path: Any = folder.url_of(METADATA_FILE)
        text = folder.cached(METADATA_FILE, f"check the URL, or write a shard set there with tools/make_shards.py "
                                            f"SRC {folder.url}").read_text(encoding="utf-8")
    else:
        path = Path(root) / METADATA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {root} is not a shard folder; write one with "
                                    f"tools/make_shards.py SRC {root}")
        text = path.read_text(encoding="utf-8")
    try:
        meta = json.loads(text)
    except ValueError as err:
        raise InputError(f"{path}: not valid JSON ({err}); make the shards again with tools/make_shards.py") from None
    if meta.get("format") != SHARD_FORMAT or meta.get("version", 0) > SHARD_FORMAT_VERSION:
        raise InputError(f"{path}: unknown shard format {meta.get('format')!r} version {meta.get('version')!r}; "
                         f"this facesiam reads {SHARD_FORMAT!r} up to version {SHARD_FORMAT_VERSION}")
    return meta
