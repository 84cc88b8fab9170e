"""The teacher pass of a distillation run: the teacher embeds every photo of a split once, cached beside the shards.

    SHARDS/teacher-cache/<teacher>-<split>-<key>/   embeddings.npy (N x D float32, row i = dataset index i),
                                                    found.npy (N int8: FOUND_BY codes), meta.json (written last)

``key`` hashes the teacher's fingerprint (weights, preprocessing, versions), the shards' dataset.json and where the
photos come from, so a changed teacher or re-made shards get a new cache and never a stale one. The photos are cut
into chunks of CHUNK; rank r of W embeds chunks r, r+W, ... and writes each atomically (``chunk-NNNNNN.npz``), so a
run killed at any moment resumes at the first missing chunk; the main process joins them when all are there.

Which photo the teacher sees (``distill.teacher_source``): a teacher brings its own preprocessing (dlib: its own
detector, 5 points and 150 px chip), so for aligned shards it reads the original photo that dataset.json's alignment
record names, with MTCNN's landmarks from that record as its fallback; otherwise the stored image (for aligned
shards the 5 points are then the template's own).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from ..data import ShardDataset
from ..data.format import METADATA_FILE, read_metadata
from ..data.images import load_rgb
from ..errors import InputError
from ..faces.template import arcface_template
from ..fileio import atomic_write, write_json

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
            raise InputError(f"{Path(data) / METADATA_FILE}: distill.teacher_source originals needs aligned shards "
                             f"whose photo folder is there ({root or 'not recorded'}); use teacher_source shards")
        self.mode = "originals" if self.root is not None else "shards"

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self) -> str:
        return (f"the original photos in {self.root} (MTCNN's landmarks from the alignment record as fallback)"
                if self.mode == "originals" else "the images stored in the shards")

    def __call__(self, index: int) -> tuple[Image.Image, Optional[np.ndarray], str]:
        path = self.dataset.paths[index]
        record = self.records.get(path)
        if self.root is not None and record is not None and (self.root / record["path"]).is_file():
            landmarks = record.get("landmarks")
            return (load_rgb(self.root / record["path"]), None if landmarks is None else np.asarray(landmarks),
                    "original")
        image = self.dataset[index][0]
        landmarks = None
        if self.info and (record is None or record.get("status") == "aligned"):
            # An aligned crop is the template: its 5 points are where the template puts them.
            landmarks = arcface_template(image.size[0])
        return image.convert("RGB"), landmarks, "stored"


def shards_fingerprint(data: str | Path) -> str:
    """sha256 of dataset.json: it lists every shard with its sample counts, so re-made shards change it."""
    return hashlib.sha256((Path(data) / METADATA_FILE).read_bytes()).hexdigest()


def cache_dir(data: str | Path, split: str, teacher: Any, mode: str) -> Path:
    fingerprint = {"version": CACHE_VERSION, "teacher": teacher.fingerprint(), "shards": shards_fingerprint(data),
                   "split": split, "source": mode}
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(teacher.name.split(":", 1)[-1]).stem if ":" in teacher.name
                  else teacher.name)
    return Path(data) / CACHE_DIR / f"{slug}-{split}-{key}"


def _embed_chunk(teacher: Any, source: PhotoSource, indices: range, batch_size: int) -> dict[str, np.ndarray]:
    found = np.zeros(len(indices), np.int8)
    origin = np.zeros(len(indices), np.int8)  # 1: original photo, 0: stored image
    emb = np.zeros((len(indices), teacher.dim), np.float32)
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if pending:
            emb[[j for j, _ in pending]] = teacher.embed([x for _, x in pending])
            pending.clear()

    for j, i in enumerate(indices):
        image, landmarks, where = source(i)
        prepared = teacher.prepare(image, landmarks)
        found[j], origin[j] = FOUND_BY[prepared.found_by], where == "original"
        if prepared.input is not None:
            pending.append((j, prepared.input))
            if len(pending) >= batch_size:
                flush()
    flush()
    return {"embeddings": emb, "found": found, "original": origin}


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_write(path, "wb", encoding=None) as f:
        np.savez(f, **arrays)


class _OneProcess:
    """What the pass needs of an Accelerator, when there is none (tools/embed.py --teacher)."""

    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


def teacher_targets(data: str | Path, split: str, teacher: Any, *, source: str = "auto", batch_size: int = 32,
                    accelerator: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings N x D, found N bool) of every photo of ``split``, from the cache or computed (by all ranks of
    ``accelerator``, or this process alone). ``source``: distill.teacher_source (auto | originals | shards)."""
    accelerator = accelerator or _OneProcess()
    photos = PhotoSource(data, split, source)
    out = cache_dir(data, split, teacher, photos.mode)
    if not (out / "meta.json").is_file():
        _fill(str(data), teacher, photos, out, accelerator, batch_size)
    emb = np.load(out / "embeddings.npy")
    found = np.load(out / "found.npy")
    if len(emb) != len(photos):
        raise InputError(f"{out}: {len(emb)} teacher embeddings for {len(photos)} photos; delete the folder to redo")
    return emb, found != FOUND_BY["none"]


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


def _join(teacher: Any, source: PhotoSource, out: Path, n: int, rate: float) -> None:
    """Concatenate the chunks into embeddings.npy and found.npy, then meta.json (last: it marks a whole cache)."""
    parts = [np.load(out / f"chunk-{c:06d}.npz") for c in range(-(-n // CHUNK))]
    emb = np.concatenate([p["embeddings"] for p in parts])
    found = np.concatenate([p["found"] for p in parts])
    original = np.concatenate([p["original"] for p in parts])
    for name, array in (("embeddings.npy", emb), ("found.npy", found)):
        with atomic_write(out / name, "wb", encoding=None) as f:
            np.save(f, array)
    counts = {k: int((found == v).sum()) for k, v in FOUND_BY.items()}
    missed = [source.dataset.paths[i] for i in np.flatnonzero(found == FOUND_BY["none"])]
    write_json(out / "meta.json", {"teacher": teacher.fingerprint(), "photos": n, "dim": int(emb.shape[1]),
                                   "found_by": counts, "from_original_photos": int(original.sum()),
                                   "no_face": missed})
    for c in range(len(parts)):
        (out / f"chunk-{c:06d}.npz").unlink()
    log.info("teacher %s: %d photos (%.1f img/s on this process): face found by the teacher in %d, from the "
             "alignment landmarks in %d, none in %d (they train on nothing; listed in %s)", teacher.name, n, rate,
             counts["teacher"], counts["landmarks"], counts["none"], out / "meta.json")
