"""Pack an ImageFolder into WebDataset tar shards with a byte-offset index (``make_shards`` / ``write_shards``).

Output layout (DST)::

    train-000000.tar ...      WebDataset shards; per sample: KEY.jpg|png|webp, KEY.cls, KEY.json
    val-000000.tar ...        only with --val-identities (whole identities held out, seeded)
    index/train.npz ...       per sample: shard, byte offset and size of the image member, label, path
    dataset.json              classes, splits, counts, options, skipped files (written last)

* Labels follow torchvision's ImageFolder (sorted identity folders); all splits share that label space.
* ``KEY`` is ``<label>_<n>`` (ASCII, no dot: WebDataset splits key and extension at the first dot);
  ``KEY.json`` is ``{"path": <path relative to SRC>, "identity": <name>, "label": <int>}`` (UTF-8), so
  ``webdataset.WebDataset(urls).decode("pil").to_tuple("jpg;png;webp", "cls", "json")`` reads every sample.
* Image bytes are stored untouched when any reader handles them; see facesiam/data/images.py for what is
  converted and why. Every image is decoded once here, so broken files are skipped (and listed) now.
* Reproducible: same input and options give byte-identical output (fixed tar metadata, input order kept).
* Crash-safe: everything is built in a hidden folder beside DST and moved into place only when complete
  (dataset.json last), so DST never shows a partial shard, and a good old dataset is replaced (--overwrite)
  only by a complete new one.

Samples stay in ImageFolder order (identity by identity), so index i of a split is stable and readable by
streaming too; training draws batches through ShardDataset and a sampler, so nothing needs pre-shuffling.
"""

from __future__ import annotations

import argparse
import array
import json
import multiprocessing
import os
import random
import shutil
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from tqdm import tqdm

from ..fileio import replace_directory
from .folder import list_image_folder, printable_name
from .images import BadImage, pack_image

# -----------------------------------------------------------------------------
# defaults
MAX_SAMPLES_PER_SHARD = 10_000
MAX_BYTES_PER_SHARD = 256 * 2**20  # WebDataset advice: shards of 100 MB - 1 GB; face crops are ~10-30 kB
FORMAT = "facesiam-shards"
FORMAT_VERSION = 1
METADATA_FILE = "dataset.json"
INDEX_DIR = "index"
IMAGE_EXTS = ("jpg", "png", "webp")  # the only image member extensions written (see images.PASS_THROUGH)
TAR_MTIME = 0  # fixed tar metadata: byte-identical shards from the same input
TAR_MODE = 0o444
WRITE_BUFFER = 4 * 2**20  # few large writes rather than three small ones per member
SKIPPED_SHOWN = 20  # skipped files printed on stderr (all of them are in dataset.json)
# -----------------------------------------------------------------------------


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- index

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
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for name, values in arrays.items():
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(values), allow_pickle=False)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "ShardIndex":
        with np.load(path, allow_pickle=False) as z:
            return cls(shards=[str(s) for s in z["shards"]], shard_bytes=z["shard_bytes"], shard=z["shard"],
                       offset=z["offset"], size=z["size"], label=z["label"], path_utf8=z["path_utf8"],
                       path_end=z["path_end"])


class _IndexBuilder:
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
    builder = _IndexBuilder()
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
                raise ValueError(f"{root / name}: sample {key!r} lacks an image or json member; "
                                 f"rebuild the shards with tools/make_shards.py")
            offset, size = sample["image"]
            builder.add(number, offset, size, int(sample["meta"]["label"]), sample["meta"]["path"])
    sizes = [(root / name).stat().st_size for name in shards]
    return builder.build(shards, sizes)


def load_index(root: str | os.PathLike, split: str, shards: list[str]) -> ShardIndex:
    """The split's offset index; rebuilt from the tars (and saved when possible) if missing or stale."""
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


def read_metadata(root: str | os.PathLike) -> dict:
    path = Path(root) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} is not a shard folder; write one with "
                                f"tools/make_shards.py SRC {root}")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: unknown shard format {meta.get('format')!r} version {meta.get('version')!r}; "
                         f"this facesiam reads {FORMAT!r} up to version {FORMAT_VERSION}")
    return meta


# ----------------------------------------------------------------------------- writing

# Tar members are written by hand: tarfile builds each header through generic Python code (~25 us a member,
# three members an image), which on 2 cores made the main process half of make_shards' time. The format is
# POSIX ustar, fixed apart from name, size and checksum; tarfile and webdataset read it (tests check both).
BLOCK = 512
RECORD = 20 * BLOCK  # archives end padded to whole records, as tar and Python's tarfile do
_HEADER_MIDDLE = (b"%07o\0" % TAR_MODE) + b"0000000\0" * 2  # mode, uid 0, gid 0
_HEADER_TAIL = ((b"%011o\0" % TAR_MTIME) + b" " * 8 + b"0" + b"\0" * 100  # mtime, checksum (spaces), regular file, link
                + b"ustar\x0000" + b"\0" * (32 + 32 + 8 + 8 + 155 + 12))  # magic+version, uname, gname, dev, prefix
_HEADER_FIXED_SUM = sum(_HEADER_MIDDLE) + sum(_HEADER_TAIL)


def ustar_header(name: str, size: int) -> bytes:
    """512-byte POSIX ustar header of a regular file (short ASCII name; fixed mode, owner and time)."""
    encoded = name.encode("ascii")
    if len(encoded) > 100 or size >= 8**11:
        raise ValueError(f"tar member {name!r} of {size} bytes does not fit a ustar header")
    size_field = b"%011o\0" % size
    checksum = _HEADER_FIXED_SUM + sum(encoded) + sum(size_field)
    tail = _HEADER_TAIL[:12] + (b"%06o\0 " % checksum) + _HEADER_TAIL[20:]
    return encoded.ljust(100, b"\0") + _HEADER_MIDDLE + size_field + tail


class _SplitWriter:
    """Writes one split's samples into size-limited tar shards and records each image member's byte offset."""

    def __init__(self, folder: Path, split: str, max_samples: int, max_bytes: int):
        self.folder, self.split = folder, split
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[str] = []
        self.shard_samples: list[int] = []
        self.shard_bytes: list[int] = []
        self.index = _IndexBuilder()
        self._file = None
        self._offset = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self.shards.append(name)
        self.shard_samples.append(0)
        self._file = open(self.folder / (name + ".tmp"), "wb", buffering=WRITE_BUFFER)
        self._offset = 0

    def _close(self) -> None:
        end = self._offset + 2 * BLOCK  # two zero blocks end the archive
        self._file.write(b"\0" * (end - self._offset + (-end % RECORD)))
        self._file.flush()
        os.fsync(self._file.fileno())  # the rename below must never expose an incomplete shard after a crash
        self.shard_bytes.append(self._file.tell())
        self._file.close()
        self._file = None
        name = self.shards[-1]
        os.replace(self.folder / (name + ".tmp"), self.folder / name)

    def add(self, key: str, image: bytes, ext: str, label: int, path: str, identity: str) -> None:
        """Append one sample as three members: KEY.<ext> (image), KEY.cls, KEY.json."""
        meta = json.dumps({"path": path, "identity": identity, "label": label}, ensure_ascii=False).encode("utf-8")
        members = ((f"{key}.{ext}", image), (f"{key}.cls", str(label).encode("ascii")), (f"{key}.json", meta))
        parts = []
        for name, data in members:
            parts += (ustar_header(name, len(data)), data, b"\0" * (-len(data) % BLOCK))
        blob = b"".join(parts)
        if self._file is not None and self.shard_samples[-1] > 0 and (
                self.shard_samples[-1] >= self.max_samples or self._offset + len(blob) > self.max_bytes):
            self._close()
        if self._file is None:
            self._open()
        self._file.write(blob)
        self.index.add(len(self.shards) - 1, self._offset + BLOCK, len(image), label, path)  # image data offset
        self._offset += len(blob)
        self.shard_samples[-1] += 1

    def finish(self) -> ShardIndex:
        if self._file is not None:
            self._close()
        return self.index.build(self.shards, self.shard_bytes)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()


Packed = Union[tuple[Optional[bytes], str, Optional[str], Optional[tuple[int, int, int]]], str]


def _pack_file(task: tuple[str, Optional[int], Optional[float], bool]) -> Packed:
    """Read and decode one file: (bytes, extension, why converted, file signature) or why it is unusable (str).

    With ``send_original`` False (worker processes), an image kept byte for byte comes back as (None, ext,
    None, (size, mtime_ns, inode)) and the writer re-reads the file, still in the page cache: sending every
    image's bytes back through the pool's pipe added ~25 % to the CPU time of decoding them (LFW, 2 workers).
    """
    path, resize, center_crop, send_original = task
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            raw = f.read()
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    try:
        packed = pack_image(raw, resize=resize, center_crop=center_crop)
    except BadImage as e:
        return str(e)
    except Exception as e:  # anything else PIL trips over must not stop a long run either
        return f"cannot convert: {type(e).__name__}: {e}"
    if packed.converted is None and not send_original:
        return None, packed.ext, None, (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    return packed.data, packed.ext, packed.converted, None


def _original_bytes(path: str, signature: tuple[int, int, int]) -> Optional[bytes]:
    """The file's bytes if it is still the file a worker checked (same size, mtime and inode), else None."""
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            if (stat.st_size, stat.st_mtime_ns, stat.st_ino) != signature:
                return None
            data = f.read()
    except OSError:
        return None
    return data if len(data) == signature[0] else None


def _choose_val_identities(candidates: list[int], val_identities: Union[int, float, None], seed: int) -> list[int]:
    """Seeded choice of whole identities (labels) for the val split, among identities that have images."""
    if val_identities is None or val_identities == 0:
        return []
    if isinstance(val_identities, float) and not float(val_identities).is_integer():
        if not 0 < val_identities < 1:
            raise ValueError(f"val_identities as a fraction must be in (0, 1), got {val_identities}")
        count = max(1, round(val_identities * len(candidates)))
    else:
        count = int(val_identities)
        if count < 0:
            raise ValueError(f"val_identities must be >= 0, got {val_identities}")
    if count >= len(candidates):
        raise ValueError(f"val_identities={val_identities} would hold out {count} of the {len(candidates)} "
                         f"identities that have images, leaving none to train on; ask for fewer")
    return sorted(random.Random(seed).sample(candidates, count))


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    src_r, dst_r = src.resolve(), dst.resolve()
    if src_r == dst_r or src_r in dst_r.parents:
        raise ValueError(f"destination {dst} is inside the source ImageFolder {src}; "
                         f"it would become an identity folder: choose a destination outside {src}")
    if dst_r in src_r.parents:
        raise ValueError(f"the source {src} is inside the destination {dst}; choose another destination")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"destination {dst} exists and is not a folder; choose a new folder")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise FileExistsError(f"destination {dst} is not empty; choose a new or empty folder, "
                                  f"or pass --overwrite to replace the shards there")
        if not (dst / METADATA_FILE).is_file():
            raise FileExistsError(f"destination {dst} is not empty and holds no {METADATA_FILE}, so it is not a "
                                  f"shard folder; refusing to replace it even with --overwrite")


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def write_shards(src: str | os.PathLike, dst: str | os.PathLike, *, val_identities: Union[int, float, None] = None,
                 max_samples_per_shard: int = MAX_SAMPLES_PER_SHARD, max_bytes_per_shard: int = MAX_BYTES_PER_SHARD,
                 workers: Optional[int] = None, seed: int = 0, resize: Optional[int] = None,
                 center_crop: Optional[float] = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Pack the ImageFolder ``src`` into WebDataset shards in ``dst``; return the dataset.json contents.

    val_identities: hold out this many (int) or this fraction (float in (0, 1)) of the identities as a ``val``
        split (chosen with ``seed``); None or 0: no val split.
    max_samples_per_shard, max_bytes_per_shard: a new shard starts when either would be exceeded.
    workers: decoding processes (default: all usable CPUs; <= 1 decodes in this process).
    resize: shrink images so the shorter side is at most this many pixels (re-encodes them); None keeps them.
    center_crop: keep the central square of this fraction of the shorter side (before resize); None keeps all.
    overwrite: replace a non-empty dst that holds a previous shard set (never anything else).
    progress: show a progress bar and a summary on stderr (skipped files are always reported).
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if max_samples_per_shard < 1 or max_bytes_per_shard < 1:
        raise ValueError("max_samples_per_shard and max_bytes_per_shard must be >= 1")
    if resize is not None and resize < 1:
        raise ValueError(f"resize must be >= 1 pixel, got {resize}")
    if center_crop is not None and not 0 < center_crop <= 1:
        raise ValueError(f"center_crop must be a fraction in (0, 1], got {center_crop}")
    if not src.is_dir():
        raise FileNotFoundError(f"source {src} is not a folder; expected an ImageFolder (one sub-folder per identity)")
    _check_destination(src, dst, overwrite)
    workers = _default_workers() if workers is None else workers

    listing = list_image_folder(src)
    if not listing.classes:
        raise ValueError(f"source {src} has no identity sub-folders; expected SRC/<identity>/<image>")
    classes = [printable_name(c) for c in listing.classes]
    candidates_per_label = np.bincount(np.asarray([label for _, label in listing.samples], np.int64),
                                       minlength=len(classes))
    val_labels = _choose_val_identities([i for i, n in enumerate(candidates_per_label) if n > 0],
                                        val_identities, seed)
    split_of = np.zeros(len(classes), np.int8)
    split_of[val_labels] = 1
    split_names = ["train", "val"] if val_labels else ["train"]

    # train samples first, then val, each in ImageFolder order; the key is <label>_<position among the
    # identity's files>, stable whatever else is skipped (an identity's files are contiguous in the listing)
    jobs = []
    for split in range(len(split_names)):
        position, previous = 0, -1
        for rel, label in listing.samples:
            if split_of[label] != split:
                continue
            position = position + 1 if label == previous else 0
            previous = label
            jobs.append((f"{label:06d}_{position:04d}", rel, label))
    in_process = workers <= 1 or len(jobs) <= 1
    tasks = ((str(src / rel), resize, center_crop, in_process) for _, rel, _ in jobs)  # consumed lazily

    skipped = [{"path": p, "reason": "file name is not valid UTF-8; rename the file"} for p in listing.bad_names]
    converted: dict[str, int] = {}
    kept_per_label = np.zeros(len(classes), np.int64)
    target = dst.resolve()  # a name to build beside, even for "." or "out/"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"  # same file system: rename is atomic
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    writers = {name: _SplitWriter(staging, name, max_samples_per_shard, max_bytes_per_shard) for name in split_names}
    pool = None
    try:
        if not in_process:
            pool = multiprocessing.get_context().Pool(workers)
            chunksize = max(1, min(64, len(jobs) // (workers * 16)))
            results = pool.imap(_pack_file, tasks, chunksize=chunksize)  # ordered: output is reproducible
        else:
            results = map(_pack_file, tasks)
        bar = tqdm(total=len(jobs), unit="img", desc="make_shards", disable=not progress, smoothing=0.1)
        for (key, rel, label), result in zip(jobs, results):
            bar.update()
            data, ext, why, signature = (None, None, None, None) if isinstance(result, str) else result
            if signature is not None:  # kept byte for byte: read it here rather than through the pipe
                data = _original_bytes(str(src / rel), signature)
                if data is None:  # changed since the worker looked: pack it again, here
                    result = _pack_file((str(src / rel), resize, center_crop, True))
                    data, ext, why, _ = (None, None, None, None) if isinstance(result, str) else result
            if isinstance(result, str):
                skipped.append({"path": rel, "reason": result})
                continue
            if why:
                converted[why] = converted.get(why, 0) + 1
            writers[split_names[split_of[label]]].add(key, data, ext, label, rel, classes[label])
            kept_per_label[label] += 1
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()

        (staging / INDEX_DIR).mkdir()
        splits = {}
        for name, writer in writers.items():
            index = writer.finish()
            index.save(index_path(staging, name))
            labels_here = np.unique(index.label)
            splits[name] = {"shards": writer.shards, "shard_samples": writer.shard_samples,
                            "num_samples": len(index), "num_identities": int(len(labels_here)),
                            "index": f"{INDEX_DIR}/{name}.npz"}
            if name == "val":
                splits[name]["identities"] = [classes[i] for i in val_labels]
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "source": str(src.resolve()),
            "options": {"val_identities": val_identities, "seed": seed, "max_samples_per_shard": max_samples_per_shard,
                        "max_bytes_per_shard": max_bytes_per_shard, "resize": resize, "center_crop": center_crop},
            "num_classes": len(classes),
            "num_samples": int(kept_per_label.sum()),
            "bytes": int(sum(sum(w.shard_bytes) for w in writers.values())),
            "classes": classes,
            "images_per_identity": kept_per_label.tolist(),
            "identities_without_images": [classes[i] for i in np.flatnonzero(kept_per_label == 0)],
            "splits": splits,
            "converted": dict(sorted(converted.items())),
            "ignored_files": listing.ignored_files,
            "loose_images": listing.loose_images,
            "skipped": skipped,
        }
        tmp = staging / (METADATA_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, staging / METADATA_FILE)  # last: its presence marks a complete shard folder
        replace_directory(staging, target, last=METADATA_FILE)
    except BaseException:
        if pool is not None:
            pool.terminate()
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    _report(meta, dst, time.perf_counter() - start, len(jobs), progress)
    return meta


def _report(meta: dict, dst: Path, seconds: float, files: int, progress: bool) -> None:
    """Problems always go to stderr (nothing bad is silent); the summary only with progress."""
    out = sys.stderr
    skipped = meta["skipped"]
    if skipped:
        print(f"make_shards: skipped {len(skipped)} unusable file(s) (all listed under \"skipped\" in "
              f"{dst / METADATA_FILE}):", file=out)
        for item in skipped[:SKIPPED_SHOWN]:
            print(f"  {item['path']}: {item['reason']}", file=out)
        if len(skipped) > SKIPPED_SHOWN:
            print(f"  ... and {len(skipped) - SKIPPED_SHOWN} more", file=out)
    if meta["identities_without_images"]:
        names = meta["identities_without_images"]
        shown = ", ".join(names[:SKIPPED_SHOWN]) + (f", ... ({len(names)} in all)" if len(names) > SKIPPED_SHOWN else "")
        print(f"make_shards: {len(names)} identity folder(s) have no usable image (kept in the label space, "
              f"0 samples): {shown}", file=out)
    if meta["loose_images"]:
        print(f"make_shards: ignored {len(meta['loose_images'])} image(s) directly in the source folder (not in "
              f"an identity folder): {', '.join(meta['loose_images'][:5])}", file=out)
    if not progress:
        return
    splits = ", ".join(f"{name} {s['num_samples']:,} images / {s['num_identities']:,} identities in "
                       f"{len(s['shards'])} shard(s)" for name, s in meta["splits"].items())
    conv = sum(meta["converted"].values())
    print(f"make_shards: {meta['num_classes']:,} identities, {meta['num_samples']:,} images ({splits}); "
          f"{len(skipped)} skipped, {conv} converted, {meta['ignored_files']} non-image file(s) ignored; "
          f"{_human_bytes(meta['bytes'])} in {seconds:.1f} s ({files / max(seconds, 1e-9):,.0f} images/s) -> {dst}",
          file=out)


# ----------------------------------------------------------------------------- command line

def _count_or_fraction(text: str) -> Union[int, float]:
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not 0 < value < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: give a count (integer) or a fraction in (0, 1)")
        return value


def _size(text: str) -> int:
    """Bytes with an optional k/M/G suffix (powers of 1024)."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    text = text.strip()
    scale = units.get(text[-1:].lower(), 1)
    number = text[:-1] if scale != 1 else text
    try:
        return int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give bytes, e.g. 268435456, 256M or 1G") from None


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="make_shards",
        description="Pack an ImageFolder (SRC/<identity>/<image>) into WebDataset tar shards plus an offset index "
                    "and DST/dataset.json. Broken images are skipped and listed, never fatal.")
    parser.add_argument("src", type=Path, help="ImageFolder: one sub-folder per identity")
    parser.add_argument("dst", type=Path, help="output folder (must be new or empty unless --overwrite)")
    parser.add_argument("--val-identities", type=_count_or_fraction, default=None,
                        help="hold out whole identities as a 'val' split: a count (e.g. 100) or a fraction "
                             "(e.g. 0.1); default: none")
    parser.add_argument("--max-samples-per-shard", type=int, default=MAX_SAMPLES_PER_SHARD,
                        help="start a new shard after this many samples (default %(default)s)")
    parser.add_argument("--max-bytes-per-shard", type=_size, default=MAX_BYTES_PER_SHARD,
                        help="start a new shard before exceeding this size, e.g. 256M or 1G (default 256M)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all usable CPUs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the val identity choice (default %(default)s)")
    parser.add_argument("--resize", type=int, default=None, metavar="PIXELS",
                        help="shrink so the shorter side is at most PIXELS (smaller shards; off by default)")
    parser.add_argument("--center-crop", type=float, default=None, metavar="FRACTION",
                        help="keep the central square of FRACTION of the shorter side before --resize "
                             "(LFW: 0.6); off by default")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing shard folder at DST")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    args = parser.parse_args(argv)
    try:
        return write_shards(args.src, args.dst, val_identities=args.val_identities,
                            max_samples_per_shard=args.max_samples_per_shard,
                            max_bytes_per_shard=args.max_bytes_per_shard, workers=args.workers, seed=args.seed,
                            resize=args.resize, center_crop=args.center_crop, overwrite=args.overwrite,
                            progress=not args.no_progress)
    except (OSError, ValueError) as e:
        raise SystemExit(f"make_shards: error: {e}") from None


if __name__ == "__main__":
    main()
