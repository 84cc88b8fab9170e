"""Pack an ImageFolder into WebDataset tar shards with a byte-offset index (``write_shards``).

The layout written is described in facesiam/data/format.py.

* Image bytes are stored untouched when any reader handles them; see facesiam/data/images.py for what is
  converted and why. Every image is decoded once here, so broken files are skipped (and listed) now.
* Reproducible: same input and options give byte-identical output (fixed tar metadata, input order kept).
* Crash-safe: everything is built in a hidden folder beside DST and moved into place only when complete
  (dataset.json last), so DST never shows a partial shard, and a good old dataset is replaced (overwrite)
  only by a complete new one.

``dst`` may be a URL (``s3://bucket/shards``, ``gs://...``): the folder is written locally in a temporary folder
(``$TMPDIR``: room for the whole set) and uploaded with dataset.json last (``remote_destination``; see
facesiam/data/remote.py), so a partial upload is never a valid shard set.

Samples stay in ImageFolder order (identity by identity), so index i of a split is stable and readable by
streaming too; training draws batches through ShardDataset and a sampler, so nothing needs pre-shuffling.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Collection, Iterator, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from ..errors import InputError, and_more
from ..fileio import staged_directory, write_json
from .folder import FolderListing, available_cpus, check_destination, list_image_folder, printable_name
from .format import SHARD_FORMAT, SHARD_FORMAT_VERSION, INDEX_DIR, METADATA_FILE, ShardIndex, IndexBuilder, index_path
from .images import BadImage, pack_image
from .remote import RemoteFolder, is_remote

MAX_SAMPLES_PER_SHARD = 10_000
MAX_BYTES_PER_SHARD = 256 * 2**20  # WebDataset advice: shards of 100 MB - 1 GB; face crops are ~10-30 kB
TAR_MTIME = 0  # fixed tar metadata: byte-identical shards from the same input
TAR_MODE = 0o444
WRITE_BUFFER = 4 * 2**20  # few large writes rather than three small ones per member
SKIPPED_SHOWN = 20  # skipped files printed on stderr (all of them are in dataset.json)



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
        self.index = IndexBuilder()
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
            raise InputError(f"val_identities as a fraction must be in (0, 1), got {val_identities}")
        count = max(1, round(val_identities * len(candidates)))
    else:
        count = int(val_identities)
        if count < 0:
            raise InputError(f"val_identities must be >= 0, got {val_identities}")
    if count >= len(candidates):
        raise InputError(f"val_identities={val_identities} would hold out {count} of the {len(candidates)} "
                         f"identities that have images, leaving none to train on; ask for fewer")
    return sorted(random.Random(seed).sample(candidates, count))



def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


_SHARD_SET_FILE = re.compile(r"[^/]+\.tar|index/[^/]+\.npz|" + re.escape(METADATA_FILE))


def is_shard_set_file(name: str) -> bool:
    """Whether ``name`` (relative to a shard folder) is a file that write_shards writes."""
    return bool(_SHARD_SET_FILE.fullmatch(name))


@contextmanager
def remote_destination(url: str, overwrite: bool = False, progress: bool = True) -> Iterator[Path]:
    """``with remote_destination("s3://b/shards") as local: write a shard folder into local`` -- checked before
    (writable, not something else, --overwrite), uploaded after with dataset.json last; never on failure."""
    folder = RemoteFolder(url)
    folder.check_destination(overwrite, marker=METADATA_FILE, own=is_shard_set_file, what="a shard folder")
    with tempfile.TemporaryDirectory(prefix="facesiam-shards-") as tmp:
        local = Path(tmp) / "shards"
        yield local
        start = time.perf_counter()
        sent = folder.upload(local, last=METADATA_FILE, overwrite=overwrite, own=is_shard_set_file, progress=progress)
        if progress:
            print(f"make_shards: uploaded {_human_bytes(sent)} in {time.perf_counter() - start:.1f} s -> {folder.url}",
                  file=sys.stderr)


def write_shards(src: str | os.PathLike, dst: str | os.PathLike, *,
                 val_identities: Union[int, float, Sequence[str], None] = None,
                 max_samples_per_shard: int = MAX_SAMPLES_PER_SHARD, max_bytes_per_shard: int = MAX_BYTES_PER_SHARD,
                 workers: Optional[int] = None, seed: int = 0, resize: Optional[int] = None,
                 center_crop: Optional[float] = None, overwrite: bool = False, progress: bool = True,
                 source: Optional[str] = None, alignment: Optional[dict] = None, unlabeled: bool = False,
                 exclude: Optional[Collection[str]] = None, shown_as: Optional[str] = None) -> dict:
    """Pack the ImageFolder ``src`` into WebDataset shards in ``dst``; return the dataset.json contents.

    ``alignment``: the alignment record of an ``src`` made by align_faces (its alignment.json, read with
    facesiam.faces.record.read_alignment), stored in dataset.json under "alignment": "info" (detector, template,
    size: what training exports for inference), "source" (the raw photos), "counts" and "images" (every source
    image: kept or skipped with the reason, box, landmarks). The shard layer does not read it itself: faces/
    builds on data/, never the other way round.

    val_identities: hold out this many (int) or this fraction (float in (0, 1)) of the identities as a ``val``
        split (chosen with ``seed``), or the identities named in a list (the same held-out people across versions
        of a data set, e.g. before and after facesiam doctor); None or 0: no val split.
    max_samples_per_shard, max_bytes_per_shard: a new shard starts when either would be exceeded.
    workers: decoding processes (default: all usable CPUs; <= 1 decodes in this process).
    resize: shrink images so the shorter side is at most this many pixels (re-encodes them); None keeps them.
    center_crop: keep the central square of this fraction of the shorter side (before resize); None keeps all.
    overwrite: replace a non-empty dst that holds a previous shard set (never anything else).
    progress: show a progress bar and a summary on stderr (skipped files are always reported).
    source: what dataset.json names as the source (default: ``src``), e.g. the raw photos behind a temporary
        aligned folder.
    unlabeled: ``src`` holds photos without identities (any folder layout): each photo is an identity of its own
        (data/folder.list_image_folder); for distillation, which needs no labels. No val split can be held out.
    exclude: paths relative to ``src`` to leave out (make_shards --exclude: the doctor's suspects); dataset.json
        counts them under options.excluded.
    shown_as: what the messages call ``dst`` (default: ``dst``), e.g. the URL a local folder is uploaded to.
    ``dst`` may be a URL (s3://, gs://): written locally, then uploaded (``remote_destination``).
    """
    if is_remote(dst):
        with remote_destination(str(dst), overwrite, progress) as local:
            return write_shards(src, local, val_identities=val_identities, max_samples_per_shard=max_samples_per_shard,
                                max_bytes_per_shard=max_bytes_per_shard, workers=workers, seed=seed, resize=resize,
                                center_crop=center_crop, progress=progress, source=source or str(Path(src).resolve()),
                                alignment=alignment, unlabeled=unlabeled, exclude=exclude, shown_as=str(dst))
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if max_samples_per_shard < 1 or max_bytes_per_shard < 1:
        raise InputError("max_samples_per_shard and max_bytes_per_shard must be >= 1")
    if resize is not None and resize < 1:
        raise InputError(f"resize must be >= 1 pixel, got {resize}")
    if center_crop is not None and not 0 < center_crop <= 1:
        raise InputError(f"center_crop must be a fraction in (0, 1], got {center_crop}")
    if not src.is_dir():
        raise FileNotFoundError(f"source {src} is not a folder; expected an ImageFolder (one sub-folder per identity)")
    check_destination(src, dst, overwrite, marker=METADATA_FILE, what="a shard folder")
    workers = available_cpus() if workers is None else workers

    if unlabeled and val_identities:
        raise InputError("--val-identities needs identities, and unlabelled photos have none: validate on labelled "
                         "shards (distillation's --val-split, or make them separately) or drop --val-identities")
    listing = list_image_folder(src, unlabeled=unlabeled, exclude=exclude)
    if not listing.classes:
        raise InputError(f"source {src} has no image files" if unlabeled else
                         f"source {src} has no identity sub-folders; expected SRC/<identity>/<image> "
                         "(photos without identities: --unlabeled)")
    classes = [printable_name(c) for c in listing.classes]
    split_of, val_labels = _assign_splits(listing, len(classes), val_identities, seed)
    split_names = ["train", "val"] if val_labels else ["train"]
    jobs = _plan_jobs(listing, split_of, len(split_names))

    target = dst.resolve()  # a name to build beside, even for "." or "out/"
    with staged_directory(target, last=METADATA_FILE) as staging:
        writers = {name: _SplitWriter(staging, name, max_samples_per_shard, max_bytes_per_shard)
                   for name in split_names}
        try:
            packed = _pack_all(src, jobs, writers, split_names, split_of, classes, resize=resize,
                               center_crop=center_crop, workers=workers, progress=progress)
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        skipped = [{"path": p, "reason": "file name is not valid UTF-8; rename the file"} for p in listing.bad_names]
        skipped += packed["skipped"]
        options = {"val_identities": val_identities, "seed": seed, "max_samples_per_shard": max_samples_per_shard,
                   "max_bytes_per_shard": max_bytes_per_shard, "resize": resize, "center_crop": center_crop,
                   "unlabeled": unlabeled, "excluded": listing.excluded}
        meta = _finish(staging, source or str(src.resolve()), writers, classes, val_labels, packed["kept_per_label"],
                       listing, options, packed["converted"], skipped, alignment)

    _report(meta, shown_as or dst, time.perf_counter() - start, len(jobs), progress)
    return meta


def _assign_splits(listing: FolderListing, n_classes: int, val_identities: Union[int, float, Sequence[str], None],
                   seed: int) -> tuple[np.ndarray, list[int]]:
    """Split number (0 train, 1 val) of every label, and the held-out labels."""
    if isinstance(val_identities, (list, tuple, set, frozenset)):  # these identities, by name
        label_of = {name: i for i, name in enumerate(listing.classes)}
        unknown = sorted(set(val_identities) - set(label_of))
        if unknown:
            raise InputError(f"val identity {unknown[0]!r} is not a folder of {listing.root}{and_more(unknown)}; "
                             "list identity folder names")
        val_labels = sorted(label_of[name] for name in set(val_identities))
    else:
        candidates_per_label = np.bincount(np.asarray([label for _, label in listing.samples], np.int64),
                                           minlength=n_classes)
        val_labels = _choose_val_identities([i for i, n in enumerate(candidates_per_label) if n > 0],
                                            val_identities, seed)
    split_of = np.zeros(n_classes, np.int8)
    split_of[val_labels] = 1
    return split_of, val_labels


def _plan_jobs(listing: FolderListing, split_of: np.ndarray, n_splits: int) -> list[tuple[str, str, int]]:
    """(key, relative path, label) of every file: train samples first, then val, each in ImageFolder order.

    The key is <label>_<position among the identity's files>, stable whatever else is skipped (an identity's
    files are contiguous in the listing).
    """
    jobs = []
    for split in range(n_splits):
        position, previous = 0, -1
        for rel, label in listing.samples:
            if split_of[label] != split:
                continue
            position = position + 1 if label == previous else 0
            previous = label
            jobs.append((f"{label:06d}_{position:04d}", rel, label))
    return jobs


def _pack_all(src: Path, jobs: list[tuple[str, str, int]], writers: dict, split_names: list[str],
              split_of: np.ndarray, classes: list[str], *, resize: Optional[int], center_crop: Optional[float],
              workers: int, progress: bool) -> dict:
    """Decode every file (in a process pool) and append the usable ones to their split's writer, in order."""
    in_process = workers <= 1 or len(jobs) <= 1
    tasks = ((str(src / rel), resize, center_crop, in_process) for _, rel, _ in jobs)  # consumed lazily
    skipped, converted = [], {}
    kept_per_label = np.zeros(len(classes), np.int64)
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
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    return {"skipped": skipped, "converted": converted, "kept_per_label": kept_per_label}


def _finish(staging: Path, source: str, writers: dict, classes: list[str], val_labels: list[int],
            kept_per_label: np.ndarray, listing: FolderListing, options: dict, converted: dict,
            skipped: list[dict], alignment: Optional[dict]) -> dict:
    """Close the shards, write the indexes and dataset.json (last: its presence marks a complete folder)."""
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
        "format": SHARD_FORMAT,
        "version": SHARD_FORMAT_VERSION,
        "source": source,
        "options": options,
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
    if alignment is not None:
        meta["alignment"] = {"info": alignment["alignment"], "source": alignment["source"],
                             "counts": alignment["counts"], "images": alignment["images"]}
    write_json(staging / METADATA_FILE, meta, indent=1, ensure_ascii=False)
    return meta


def _report(meta: dict, dst: Union[Path, str], seconds: float, files: int, progress: bool) -> None:
    """Problems always go to stderr (nothing bad is silent); the summary only with progress."""
    out = sys.stderr
    skipped = meta["skipped"]
    if skipped:
        print(f"make_shards: skipped {len(skipped)} unusable file(s) (all listed under \"skipped\" in "
              f"{dst}/{METADATA_FILE}):", file=out)
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


