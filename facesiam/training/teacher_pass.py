"""The teacher pass of a distillation run: the teacher embeds every photo of a split once, and the result is cached.

    CACHE/<teacher>-<split>-<key>/   embeddings.npy (N x D float32, row i = dataset index i),
                                     found.npy (N int8: FOUND_BY codes), meta.json (written last)

Where CACHE is (``cache_dir``; the same rule for a distillation run, ``embed --teacher``, ``fit`` and the doctor):

1. ``SHARDS/teacher-cache/`` when SHARDS is a local folder that holds a complete cache of this key, or that this
   process may write: every run on those shards shares it, and it goes when the shards go.
2. Otherwise (shards at a URL: ``s3://``, ``gs://``, ``https://``; or a read-only local folder)
   ``$FACESIAM_CACHE/teacher-cache/`` (default ``~/.cache/facesiam/teacher-cache/``, the folder remote metadata is
   cached in: facesiam/data/remote.py ``cache_root``). Set ``FACESIAM_CACHE`` to a folder beside the run to keep the
   cache with it; with several nodes it must be a folder every node sees (rank r writes its own chunks there).

``key`` hashes the teacher's fingerprint (weights, preprocessing, versions), the shards' dataset.json, the split
and where the photos come from, so a changed teacher or re-made shards get a new cache and never a stale one. In
the shared folder of rule 2 the key also holds where the shards are (the URL, or the local folder's real path) and
their index (every sample's shard, offset and size), so two data sets never share a cache there. The photos are cut
into chunks of CHUNK; rank r of W embeds chunks r, r+W, ... and writes each atomically (``chunk-NNNNNN.npz``), so a
run killed at any moment resumes at the first missing chunk; the main process joins them when all are there. One
process without an Accelerator (fit's teacher stage) can deal the chunks to ``processes`` local processes the same
way (dlib's network runs on one core: two processes, twice the photos per second).
Shards at a URL are read through the remote shard reader (facesiam/data/remote.py): a chunk's stored images are
fetched in parallel, never a whole tar.

Which photo the teacher sees (``distill.teacher_source``): a teacher brings its own preprocessing (dlib: its own
detector, 5 points and 150 px chip), so for aligned shards it reads the original photo that dataset.json's alignment
record names, with MTCNN's landmarks from that record as its fallback; otherwise the stored image (for aligned
shards the 5 points are then the template's own).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from ..data import ShardDataset
from ..data.format import METADATA_FILE, read_metadata
from ..data.images import load_rgb
from ..data.remote import RemoteFolder, cache_root, is_remote
from ..errors import InputError
from ..faces.teachers import embed_photos
from ..faces.template import arcface_template
from ..fileio import atomic_write, write_json
from ..processes import helper_pool

log = logging.getLogger("facesiam.train")

CACHE_DIR = "teacher-cache"
CHUNK = 256  # photos per cache file: the unit of resume after a kill and of the split across ranks
FOUND_BY = {"none": 0, "teacher": 1, "landmarks": 2}  # how the teacher found each photo's face (found.npy codes)
CACHE_VERSION = 1


class PhotoSource:
    """Photo i of a shard split as the teacher should see it: (RGB image, 5 landmarks or None, where it came from)."""

    def __init__(self, data: str | Path, split: str, mode: str = "auto"):
        self.dataset = ShardDataset(data, split)
        alignment = read_metadata(data).get("alignment") or {}
        self.info = alignment.get("info")
        self.records: dict[str, dict] = {}
        root = Path(alignment.get("source") or "")
        if alignment and mode != "shards":
            self.records = {r["output"]: r for r in alignment.get("images", []) if r.get("output")}
        self.root = root if self.records and root.is_dir() else None
        if mode == "originals" and self.root is None:
            raise InputError(f"{str(data).rstrip('/')}/{METADATA_FILE}: distill.teacher_source originals needs "
                             f"aligned shards whose photo folder is there ({root or 'not recorded'}); use "
                             f"teacher_source shards")
        self.mode = "originals" if self.root is not None else "shards"

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self) -> str:
        return (f"the original photos in {self.root} (MTCNN's landmarks from the alignment record as fallback)"
                if self.mode == "originals" else "the images stored in the shards")

    def __call__(self, index: int) -> tuple[Image.Image, Optional[np.ndarray], str]:
        return self.many([index])[0]

    def many(self, indices: Sequence[int]) -> list[tuple[Image.Image, Optional[np.ndarray], str]]:
        """``self(i)`` for each of ``indices``; the stored images are read as one batch (at a URL: in parallel)."""
        out: list = [None] * len(indices)
        stored = []
        for k, index in enumerate(indices):
            record = self.records.get(self.dataset.paths[index])
            if self.root is not None and record is not None and (self.root / record["path"]).is_file():
                landmarks = record.get("landmarks")
                out[k] = (load_rgb(self.root / record["path"]), None if landmarks is None else np.asarray(landmarks),
                          "original")
            else:
                stored.append((k, index, record))
        images = self.dataset.__getitems__([index for _, index, _ in stored]) if stored else []
        for (k, _, record), (image, _) in zip(stored, images):
            landmarks = None
            if self.info and (record is None or record.get("status") == "aligned"):
                # An aligned crop is the template: its 5 points are where the template puts them.
                landmarks = arcface_template(image.size[0])
            out[k] = (image.convert("RGB"), landmarks, "stored")
        return out


def shards_fingerprint(data: str | Path) -> str:
    """sha256 of dataset.json: it lists every shard with its sample counts, so re-made shards change it."""
    if is_remote(data):  # the local copy of the remote file (fetched again when the remote one changes)
        folder = RemoteFolder(str(data))
        path = folder.cached(METADATA_FILE, f"check the URL, or write a shard set there with tools/make_shards.py "
                                            f"SRC {folder.url}")
    else:
        path = Path(data) / METADATA_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _index_fingerprint(photos: "PhotoSource") -> str:
    """sha256 of the split's index (each sample's shard, byte offset and size; each shard's size)."""
    index = photos.dataset._index
    digest = hashlib.sha256()
    for array in (index.shard_bytes, index.shard, index.offset, index.size):
        digest.update(np.ascontiguousarray(array, np.int64).tobytes())
    return digest.hexdigest()


def _writable(folder: Path) -> bool:
    """Whether this process may make and fill SHARDS/teacher-cache/."""
    cache = folder / CACHE_DIR
    return os.access(cache if cache.is_dir() else folder, os.W_OK | os.X_OK)


def cache_dir(data: str | Path, split: str, teacher: Any, photos: "PhotoSource") -> Path:
    """The cache folder of ``teacher``'s pass over ``photos`` (a PhotoSource of ``data``/``split``), by the rule in
    the module docstring: beside local shards where possible, else under ``$FACESIAM_CACHE/teacher-cache/``."""
    fingerprint = {"version": CACHE_VERSION, "teacher": teacher.fingerprint(), "shards": shards_fingerprint(data),
                   "split": split, "source": photos.mode}
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(teacher.name.split(":", 1)[-1]).stem if ":" in teacher.name
                  else teacher.name)

    def name(fp: dict) -> str:
        return f"{slug}-{split}-{hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]}"

    if not is_remote(data):
        beside = Path(data) / CACHE_DIR / name(fingerprint)
        if (beside / "meta.json").is_file() or _writable(Path(data)):
            return beside
    location = str(data).rstrip("/") if is_remote(data) else str(Path(data).resolve())
    fingerprint.update(location=location, index=_index_fingerprint(photos))
    return cache_root() / CACHE_DIR / name(fingerprint)


def _embed_chunk(teacher: Any, source: PhotoSource, indices: range, batch_size: int) -> dict[str, np.ndarray]:
    origin = np.zeros(len(indices), np.int8)  # 1: original photo, 0: stored image

    def photos() -> Iterator[tuple[Image.Image, Optional[np.ndarray]]]:
        # a teacher batch of photos read at once (at a URL: in parallel), never a whole chunk of large originals
        for s in range(0, len(indices), batch_size):
            for j, (image, landmarks, where) in enumerate(source.many(indices[s:s + batch_size]), s):
                origin[j] = where == "original"
                yield image, landmarks

    emb, found_by = embed_photos(teacher, photos(), len(indices), batch_size)
    return {"embeddings": emb, "found": np.array([FOUND_BY[f] for f in found_by], np.int8), "original": origin}


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_write(path, "wb", encoding=None) as f:
        np.savez(f, **arrays)


class _LocalRanks:
    """What the pass needs of an Accelerator, when there is none: rank ``index`` of ``count`` local processes.
    Rank 0 is this process; its wait_for_everyone waits for the others (``helpers``: their futures)."""

    def __init__(self, index: int = 0, count: int = 1, helpers: Sequence[Any] = ()):
        self.process_index, self.num_processes, self.is_main_process = index, count, index == 0
        self.helpers = list(helpers)

    def wait_for_everyone(self) -> None:
        for helper in self.helpers:
            helper.result()  # a helper's error is raised here
        self.helpers = []


def _fill_as_rank(data: str, split: str, teacher: Any, source: str, out: str, rank: int, count: int,
                  batch_size: int, chunk: int) -> None:
    """A helper process's part of the pass (rank ``rank`` of ``count``); ``teacher`` arrives pickled (the real
    teachers pickle as how to build them again)."""
    global CHUNK
    CHUNK = chunk  # this process only exists for this pass: its chunks must be the caller's
    _fill(data, teacher, PhotoSource(data, split, source), Path(out), _LocalRanks(rank, count), batch_size)


def teacher_targets(data: str | Path, split: str, teacher: Any, *, source: str = "auto", batch_size: int = 32,
                    accelerator: Any = None, processes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings N x D, found N bool) of every photo of ``split``, from the cache or computed (by all ranks of
    ``accelerator``, or by ``processes`` local processes: this one and helpers given the teacher pickled).
    ``source``: distill.teacher_source (auto | originals | shards)."""
    photos = PhotoSource(data, split, source)
    out = cache_dir(data, split, teacher, photos)
    if not (out / "meta.json").is_file():
        if accelerator is not None:
            _fill(str(data), teacher, photos, out, accelerator, batch_size)
        else:
            count = max(1, min(processes, -(-len(photos) // CHUNK)))  # no more processes than chunks
            executor = helper_pool(count - 1) if count > 1 else contextlib.nullcontext()
            with executor as pool:
                helpers = [pool.submit(_fill_as_rank, str(data), split, teacher, photos.mode, str(out), rank, count,
                                       batch_size, CHUNK) for rank in range(1, count)]
                _fill(str(data), teacher, photos, out, _LocalRanks(0, count, helpers), batch_size)
    emb = np.load(out / "embeddings.npy")
    found = np.load(out / "found.npy")
    if len(emb) != len(photos):
        raise InputError(f"{out}: {len(emb)} teacher embeddings for {len(photos)} photos; delete the folder to redo")
    return emb, found != FOUND_BY["none"]


def carry_over(src: str | Path, dst: str | Path, teacher: Any, *, source: str = "auto") -> int:
    """Give the shards ``dst``, re-made from some of the photos of the shards ``src`` (e.g. without the doctor's
    suspects), the teacher's embeddings of those photos from ``src``'s cache instead of a second pass; returns the
    photos carried. A photo is the same photo when its path in the shards is: both were written from one aligned
    folder (a teacher embeds the photo, not the shard it is in). ``src``'s cache is filled first if needed."""
    carried = 0
    rows: dict[str, tuple[np.ndarray, int]] = {}
    for split in sorted(read_metadata(src)["splits"]):
        photos = PhotoSource(src, split, source)
        folder = cache_dir(src, split, teacher, photos)
        if not (folder / "meta.json").is_file():
            teacher_targets(src, split, teacher, source=source)
        emb, found = np.load(folder / "embeddings.npy"), np.load(folder / "found.npy")
        rows.update((path, (emb[i], int(found[i]))) for i, path in enumerate(photos.dataset.paths))
    for split in sorted(read_metadata(dst)["splits"]):
        photos = PhotoSource(dst, split, source)
        out = cache_dir(dst, split, teacher, photos)
        if (out / "meta.json").is_file():
            continue
        missing = [path for path in photos.dataset.paths if path not in rows]
        if missing:
            raise InputError(f"{dst}: {len(missing)} photos ({missing[0]}, ...) are not in {src}; run the teacher "
                             f"pass on {dst} itself")
        emb = np.stack([rows[path][0] for path in photos.dataset.paths]).astype(np.float32)
        found = np.array([rows[path][1] for path in photos.dataset.paths], np.int8)
        _write_cache(out, teacher, photos.dataset.paths, emb, found, carried_from=str(src))
        carried += len(found)
    return carried


def _fill(data: str, teacher: Any, source: PhotoSource, out: Path, accelerator, batch_size: int) -> None:
    from tqdm.auto import tqdm

    n, rank, world = len(source), accelerator.process_index, accelerator.num_processes
    chunks = [c for c in range(-(-n // CHUNK)) if c % world == rank]
    todo = [c for c in chunks if not (out / f"chunk-{c:06d}.npz").is_file()]
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        log.info("teacher %s: embedding %d photos of %s/%s (%s) once, cached in %s; %d of this process's %d chunks "
                 "already there", teacher.name, n, data, source.dataset.split, source.describe(), out,
                 len(chunks) - len(todo), len(chunks))
    t0 = time.time()
    photos = sum(min(CHUNK, n - c * CHUNK) for c in todo)
    bar = tqdm(total=photos, desc=f"teacher {teacher.name}", unit="img", disable=not accelerator.is_main_process)
    for c in todo:
        indices = range(c * CHUNK, min(n, (c + 1) * CHUNK))
        _save_npz(out / f"chunk-{c:06d}.npz", _embed_chunk(teacher, source, indices, batch_size))
        bar.update(len(indices))
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _join(teacher, source, out, n, photos / max(time.time() - t0, 1e-9))
    accelerator.wait_for_everyone()


def _write_cache(out: Path, teacher: Any, paths: Sequence[str], emb: np.ndarray, found: np.ndarray,
                 **meta: Any) -> dict[str, int]:
    """embeddings.npy and found.npy, then meta.json (last: it marks a whole cache); returns the found_by counts."""
    out.mkdir(parents=True, exist_ok=True)
    for name, array in (("embeddings.npy", emb), ("found.npy", found)):
        with atomic_write(out / name, "wb", encoding=None) as f:
            np.save(f, array)
    counts = {k: int((found == v).sum()) for k, v in FOUND_BY.items()}
    write_json(out / "meta.json", {"teacher": teacher.fingerprint(), "photos": len(found), "dim": int(emb.shape[1]),
                                   "found_by": counts, **meta,
                                   "no_face": [paths[i] for i in np.flatnonzero(found == FOUND_BY["none"])]})
    return counts


def _join(teacher: Any, source: PhotoSource, out: Path, n: int, rate: float) -> None:
    """Concatenate the chunks into embeddings.npy and found.npy, then meta.json (last: it marks a whole cache)."""
    parts = [np.load(out / f"chunk-{c:06d}.npz") for c in range(-(-n // CHUNK))]
    emb = np.concatenate([p["embeddings"] for p in parts])
    found = np.concatenate([p["found"] for p in parts])
    original = np.concatenate([p["original"] for p in parts])
    counts = _write_cache(out, teacher, source.dataset.paths, emb, found, from_original_photos=int(original.sum()))
    for c in range(len(parts)):
        (out / f"chunk-{c:06d}.npz").unlink()
    log.info("teacher %s: %d photos (%.1f img/s on this process): face found by the teacher in %d, from the "
             "alignment landmarks in %d, none in %d (they train on nothing; listed in %s)", teacher.name, n, rate,
             counts["teacher"], counts["landmarks"], counts["none"], out / "meta.json")
