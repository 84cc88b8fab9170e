"""A user's photos seen the way a trained model sees them: every photo's file, identity, alignment record, aligned
crop, embedding, sharpness and file hash. The doctor and the clustering both start from here.

DATA can be a raw ImageFolder (photos are detected and aligned as the model was trained, into a temporary folder),
an aligned folder (alignment.json) or a shard folder (dataset.json, every split), also at a URL (``s3://``, ``gs://``,
``https://``: read through facesiam/data/remote.py, a batch of samples at a time). Files are always named by the
user's *source* photos (relative to ``Photos.root``): that is what a user reviews, quarantines, and what
``make_shards --exclude`` skips.

A teacher embeds shards through the teacher pass (training/teacher_pass.py ``teacher_targets``, passed in as
``teacher_pass``: curate/ does not import training/), so the doctor reuses the cache that a distillation run or
``embed --teacher`` filled for the same shards and teacher, or fills it for them: the two never disagree.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from ..data.folder import available_cpus, list_image_folder
from ..data.format import METADATA_FILE, read_metadata
from ..data.images import decode_rgb, load_rgb
from ..data.readers import ShardDataset, _FaceDataset
from ..data.remote import is_remote
from ..errors import InputError, and_more
from ..faces.quality import sharpness
from ..faces.record import read_alignment
from ..faces.teachers import embed_photos
from ..faces.template import TEMPLATE_SIZE
from ..fileio import sha256_file
from ..processes import helper_pool

log = logging.getLogger("facesiam.curate")

THUMB_SIZE = 96  # px: contact-sheet thumbnails
BLOCK = 256  # shard samples read as one batch (at a URL: their range requests in parallel)
# training/teacher_pass.py teacher_targets: (data, split, teacher, batch_size=...) -> (embeddings N x D, found N)
TeacherPass = Callable[..., tuple[np.ndarray, np.ndarray]]


@dataclass
class Photos:
    """One row per source photo (also those without a face, which have no embedding)."""

    root: Path
    """Folder the source photos live in; ``files`` are relative to it."""
    files: list[str]
    identities: list[str]
    """Each photo's identity (folder name); "" for unlabelled photos."""
    records: list[Optional[dict]]
    """Each photo's alignment record (status, skip, faces, score, box), None where no detector ran."""
    embeddings: np.ndarray
    """N x D unit rows (zero rows where ``embedded`` is False)."""
    embedded: np.ndarray
    sharpness: np.ndarray
    """Variance of the Laplacian of each embedded photo's grey model input (NaN elsewhere); see ``sharpness``."""
    sha256: list[Optional[str]]
    """Hash of each file's bytes (None: unreadable)."""
    image: Callable[[int], Optional[Image.Image]] = field(repr=False)
    """Photo i as the model saw it (its aligned crop when aligned), or the original; None when unreadable."""
    meta: dict = field(default_factory=dict)
    crop_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    """Each photo's index in the reader of what the model sees (-1: none)."""
    stored: Optional[Callable[[int], Optional[bytes]]] = field(default=None, repr=False)
    """Shards only: photo i's image bytes as stored in them (None: not in the shards), for outputs that need the
    file where the original photos are not at hand (shards at a URL)."""

    def __len__(self) -> int:
        return len(self.files)

    def thumbnail(self, i: int, size: int = THUMB_SIZE) -> Optional[Image.Image]:
        image = self.image(i)
        if image is None:
            return None
        image = image.copy()
        image.thumbnail((size, size))
        return image


class _Files(_FaceDataset):
    """Image files (or shard samples) by index, for the embedding loop."""

    def __init__(self, read: Callable[[int], Image.Image], n: int, transform: Optional[Callable] = None):
        self.read, self.transform = read, transform
        self.labels, self.classes = np.zeros(n, np.int64), ["all"]

    def _image(self, index: int) -> Image.Image:
        return self.read(index)

    def __getitems__(self, keys: list) -> list:
        """A batch (torch's DataLoader asks for one): shard samples read together (at a URL: in parallel)."""
        if not hasattr(self.read, "many"):
            return [self[k] for k in keys]
        parsed = [self._key(k) for k in keys]
        images = self.read.many([index for index, _ in parsed])
        return [self._item(index, seed, image) for (index, seed), image in zip(parsed, images)]


class _FolderReader:
    """Picklable: files under a folder (DataLoader workers get a copy)."""

    def __init__(self, root: Path, paths: Sequence[str]):
        self.root, self.paths = root, list(paths)

    def __call__(self, i: int) -> Image.Image:
        return load_rgb(self.root / self.paths[i])


class _ShardReader:
    """Picklable: samples of shard splits (a folder or a URL), by position in their concatenation."""

    def __init__(self, root: str | Path, splits: Sequence[str], keep: Sequence[tuple[int, int]]):
        self.root, self.splits, self.keep = root, list(splits), list(keep)
        self._open: dict[int, ShardDataset] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def _dataset(self, split: int) -> ShardDataset:
        if split not in self._open:
            self._open[split] = ShardDataset(self.root, self.splits[split])
        return self._open[split]

    def raw(self, i: int) -> bytes:
        split, index = self.keep[i]
        return self._dataset(split).read_bytes(index)

    def iter_raw(self, positions: Sequence[int]) -> Iterator[tuple[int, bytes]]:
        """(k, bytes of sample ``positions[k]``) for every k, BLOCK samples a batch (at a URL: fetched in parallel,
        yielded as they arrive)."""
        for start in range(0, len(positions), BLOCK):
            by_split: dict[int, list[tuple[int, int]]] = defaultdict(list)
            for k in range(start, min(len(positions), start + BLOCK)):
                split, index = self.keep[int(positions[k])]
                by_split[split].append((k, index))
            for split, items in by_split.items():
                for j, data in self._dataset(split).iter_bytes([index for _, index in items]):
                    yield items[j][0], data

    def __call__(self, i: int) -> Image.Image:
        return decode_rgb(self.raw(i))


def _sha256(path: Path) -> Optional[str]:
    try:
        return sha256_file(path)
    except OSError:  # unreadable: its alignment record says so
        return None


def _records_by(records: Sequence[dict], key: str) -> dict[str, dict]:
    return {r[key]: r for r in records if r.get(key)}


def _check_alignment(model_alignment: Optional[dict], data_alignment: Optional[dict], data: Path) -> None:
    """Refuse aligned data the model would see differently from its training faces (one line, with the fix)."""
    if data_alignment is None:
        return
    if model_alignment is None:
        raise InputError(f"{data} holds aligned face crops but the model was trained on unaligned images; give "
                         "the doctor the raw photos, or a model trained on aligned faces")
    keys = ("size", "multi")
    differ = [k for k in keys if data_alignment.get(k) != model_alignment.get(k)]
    names = [(a.get("detector") or {}).get("name") for a in (data_alignment, model_alignment)]
    templates = [(a.get("template") or {}).get("name") for a in (data_alignment, model_alignment)]
    if differ or names[0] != names[1] or templates[0] != templates[1]:
        what = ", ".join(f"{k} {data_alignment.get(k)} vs {model_alignment.get(k)}" for k in differ) or \
            f"detector/template {names[0]}/{templates[0]} vs {names[1]}/{templates[1]}"
        raise InputError(f"{data} was aligned differently from the model's training faces ({what}); give the doctor "
                         "the raw photos (they are aligned as the model was trained) or align them that way")


def detection_only(multi: str = "largest") -> dict:
    """Alignment settings for a model that does not dictate them (trained on unaligned images, or a teacher with
    its own face pipeline): the detector's findings and the crops for the contact sheets are wanted either way."""
    return {"detector": {"name": "mtcnn"}, "template": {"name": "arcface"}, "multi": multi}


def _align_raw(data: Path, work: Path, info: dict, unlabeled: bool, workers: Optional[int], progress: bool) -> dict:
    """align_folder DATA into ``work`` as ``info`` (the model's alignment_info) says."""
    from ..faces.aligner import aligner_for
    from ..faces.folder import align_folder

    aligner = aligner_for(info)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(unit="img", desc="detect and align", leave=False)

    def report(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done)

    try:
        return align_folder(data, work, size=aligner.size, workers=workers, min_face_size=aligner.min_face_size,
                            multi=aligner.multi, detector=str((info.get("detector") or {}).get("name", "mtcnn")),
                            on_no_face="skip", progress=report, unlabeled=unlabeled)
    finally:
        if bar is not None:
            bar.close()


def _check_identities(data: Path, listing: Any) -> None:
    have = {label for _, label in listing.samples}
    empty = [c for i, c in enumerate(listing.classes) if i not in have]
    if empty:
        raise InputError(f"identity folder {data / empty[0]} holds no photos{and_more(empty)}; put its photos in it "
                         "or remove it")


def load_photos(data: str | os.PathLike, embedder: Any, work: Path, *, unlabeled: bool = False,
                workers: Optional[int] = None, batch_size: int = 64, num_workers: int = 0,
                progress: bool = True, multi: str = "largest", detect: bool = True,
                teacher_pass: Optional[TeacherPass] = None) -> Photos:
    """Detect, align (as ``embedder``'s model was trained) and embed every photo of DATA; see the module docstring.

    data: a folder, or shards at a URL. embedder: a TorchEmbedder or OnnxEmbedder (eval/embed.py ``open_embedder``),
    or a Teacher (faces/teachers.py: it embeds the original photos its own way). work: an empty folder for the
    aligned crops of raw photos (the caller deletes it). multi: which face to keep when the model does not say (see
    detection_only). detect: run the face detector on raw photos for an unaligned model too (its findings: no face,
    several faces...). teacher_pass: training/teacher_pass.py ``teacher_targets``, how a teacher embeds shards.
    """
    shards = is_remote(data)
    if not shards:
        data = Path(data)
        if not data.is_dir():
            raise NotADirectoryError(f"{data} is not a folder; give an ImageFolder (one sub-folder per identity), an "
                                     "aligned folder or a shard folder (or shards at s3://, gs://, https://)")
        shards = (data / METADATA_FILE).is_file()
    teacher = hasattr(embedder, "prepare")
    t0 = time.perf_counter()
    if shards:
        if teacher and teacher_pass is None:
            raise InputError(f"{data} is a shard folder: a teacher embeds shards through the teacher pass (facesiam "
                             "doctor/cluster --teacher, or pass teacher_pass); or give the photos' folder")
        photos, crops = _from_shards(data, None if teacher else embedder.alignment, check=not teacher)
    else:
        alignment = None if teacher else embedder.alignment
        photos, crops = _from_folder(data, alignment, work, unlabeled, workers, progress, multi, teacher, detect)
    size = TEMPLATE_SIZE if teacher else int(getattr(embedder, "image_size", None) or embedder.cfg.image_size)
    _measure_sharpness(photos, crops, size)
    rows = np.flatnonzero(photos.embedded)
    log.info("%d photos, %d with a face to embed (%.1fs)", len(photos), len(rows), time.perf_counter() - t0)
    t1 = time.perf_counter()
    if teacher:
        emb, found = (_teacher_on_shards(teacher_pass, embedder, data, photos, rows, batch_size) if shards else
                      _embed_teacher(embedder, photos, rows, batch_size, progress, workers or available_cpus()))
        photos.embedded[rows[~found]] = False
    else:
        emb = _embed(embedder, _Files(_Rows(crops, photos.crop_index, rows), len(rows)), batch_size, num_workers,
                     progress)
    photos.embeddings = np.zeros((len(photos), emb.shape[1]), np.float32)
    photos.embeddings[rows] = emb
    seconds = time.perf_counter() - t1
    photos.meta["embed_seconds"] = round(seconds, 2)
    log.info("embedded %d photos in %.1fs (%.0f photos/s)", len(rows), seconds, len(rows) / max(seconds, 1e-9))
    return photos


class _Rows:
    """Picklable: crop reader indexed by embedding row."""

    def __init__(self, read: Callable[[int], Image.Image], crop_index: np.ndarray, rows: np.ndarray):
        self.read, self.index = read, crop_index[rows]

    def __call__(self, q: int) -> Image.Image:
        return self.read(int(self.index[q]))

    def many(self, qs: Sequence[int]) -> list[Image.Image]:
        """Rows ``qs``: shard samples read as one batch (at a URL: in parallel), files one by one."""
        if isinstance(self.read, _ShardReader):
            return [decode_rgb(raw) for raw in _raw_block(self.read, self.index[np.asarray(qs, np.int64)])]
        return [self(q) for q in qs]


def _measure_sharpness(photos: Photos, crops: Callable[[int], Image.Image], size: int) -> None:
    """Sharpness of every photo to embed, read in threads (decoding releases the GIL); a photo that cannot be read
    is not embedded and gets an "unreadable" record."""

    def measure(i: int) -> Any:
        try:
            return sharpness(crops(int(photos.crop_index[i])), size)
        except Exception as err:  # noqa: BLE001 -- one bad file must not stop the doctor
            return f"cannot read: {type(err).__name__}: {err}"

    def measure_raw(raw: bytes) -> Any:
        try:
            return sharpness(decode_rgb(raw), size)
        except Exception as err:  # noqa: BLE001 -- as measure
            return f"cannot read: {type(err).__name__}: {err}"

    rows = np.flatnonzero(photos.embedded)
    values: Iterator[Any]
    with concurrent.futures.ThreadPoolExecutor(max(1, min(4, available_cpus()))) as pool:
        if isinstance(crops, _ShardReader):  # a batch of samples read at once (at a URL: in parallel), then measured
            blocks = (_raw_block(crops, photos.crop_index[rows[s:s + BLOCK]]) for s in range(0, len(rows), BLOCK))
            values = (value for block in blocks for value in pool.map(measure_raw, block))
        else:
            values = pool.map(measure, rows)
        for i, value in zip(rows, values):
            if isinstance(value, str):
                photos.embedded[i] = False
                photos.records[i] = {"path": photos.files[i], "output": None, "status": "skipped", "faces": 0,
                                     "reason": value, "skip": "unreadable"}
            else:
                photos.sharpness[i] = value


def _raw_block(reader: _ShardReader, positions: np.ndarray) -> list[bytes]:
    """The stored bytes of samples ``positions``, in that order, read as one batch."""
    out: list = [None] * len(positions)
    for k, data in reader.iter_raw(positions):
        out[k] = data
    return out


def _teacher_on_shards(teacher_pass: TeacherPass, teacher: Any, data: str | Path, photos: Photos, rows: np.ndarray,
                       batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A teacher's embedding of each shard photo of ``rows`` and whether it found a face, through the teacher pass:
    its cache when there is one for these shards and this teacher, else computed once (by every split) and cached."""
    per_split = [teacher_pass(str(data), split, teacher, batch_size=batch_size) for split in photos.meta["splits"]]
    emb = np.concatenate([e for e, _ in per_split])
    found = np.concatenate([f for _, f in per_split])
    index = photos.crop_index[rows]  # rows of the splits' concatenation (_from_shards keeps their order)
    return emb[index], found[index]


def _embed_teacher(teacher: Any, photos: Photos, rows: np.ndarray, batch_size: int, progress: bool,
                   processes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A teacher's embedding of each original photo (its own face pipeline; the detector's landmarks as the
    fallback) and whether it found a face; batches on ``processes`` helper processes given the teacher pickled
    (teachers embed on one core: dlib's network 7.4 photos/s on LFW), here when 1."""
    from tqdm.auto import tqdm

    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        marks = [(photos.records[r] or {}).get("landmarks") for r in chunk]
        batches.append(([str(photos.root / photos.files[r]) for r in chunk], marks))
    processes = max(1, min(processes, len(batches)))
    with helper_pool(processes, _set_teacher, (teacher,)) if processes > 1 else contextlib.nullcontext() as pool:
        done = pool.map(_teacher_batch, batches) if pool else (_teacher_batch(b, teacher) for b in batches)
        results = list(tqdm(done, total=len(batches), desc=f"embed ({teacher.name})", unit="batch",
                            disable=not progress, leave=False))
    emb, found = np.zeros((len(rows), teacher.dim), np.float32), np.zeros(len(rows), bool)
    for start, (e, f) in zip(range(0, len(rows), batch_size), results):
        emb[start:start + len(f)], found[start:start + len(f)] = e, f
    return emb, found


_helper_teacher: Any = None


def _set_teacher(teacher: Any) -> None:
    """A helper process's start: the teacher it embeds with (unpickled once, not once a batch)."""
    global _helper_teacher
    _helper_teacher = teacher


def _teacher_batch(batch: tuple[list[str], list], teacher: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, zero rows where no face; found per photo) for one batch of (paths, landmarks)."""
    teacher = teacher or _helper_teacher
    photos = ((load_rgb(path), np.asarray(marks, np.float64) if marks else None) for path, marks in zip(*batch))
    emb, found_by = embed_photos(teacher, photos, len(batch[0]), len(batch[0]))
    return emb, np.array([f != "none" for f in found_by], bool)


def _embed(embedder: Any, dataset: _Files, batch_size: int, num_workers: int, progress: bool) -> np.ndarray:
    """The photos' unit embeddings: torch models through the one embedding loop (eval.embed.embed_dataset, with
    loader workers), ONNX exports through onnxruntime batch by batch."""
    from ..eval.embed import TorchEmbedder, embed_dataset, embed_pictures

    if isinstance(embedder, TorchEmbedder):
        dataset.transform = embedder.transform
        emb, _ = embed_dataset(embedder.model, dataset, batch_size=batch_size, num_workers=num_workers,
                               progress=progress)
        return emb
    return embed_pictures(embedder, dataset, batch_size=batch_size, progress=progress)


def _photos(root: Path, files: list[str], identities: list[str], records: list[Optional[dict]],
            crop_index: np.ndarray, sha: list[Optional[str]], crops: Callable[[int], Image.Image],
            originals: Optional[Path], meta: dict) -> Photos:
    """Photos before embedding: ``crop_index[i]`` is photo i's index in ``crops`` (-1: nothing to embed);
    ``originals``: the folder to show a photo without a crop from (None: not available)."""
    n = len(files)

    def image(i: int) -> Optional[Image.Image]:
        try:
            if crop_index[i] >= 0:
                return crops(int(crop_index[i]))
            return load_rgb(originals / files[i]) if originals is not None else None
        except Exception:  # noqa: BLE001 -- unreadable: its finding says so; the sheet shows an empty frame
            return None

    return Photos(root, files, identities, records, np.zeros((n, 0), np.float32), crop_index >= 0,
                  np.full(n, np.nan), sha, image, meta, crop_index)


def _from_folder(data: Path, alignment: Optional[dict], work: Path, unlabeled: bool, workers: Optional[int],
                 progress: bool, multi: str = "largest", teacher: bool = False,
                 detect: bool = True) -> tuple[Photos, Callable[[int], Image.Image]]:
    """A raw folder (detected and aligned here) or an aligned folder (alignment.json)."""
    recorded = read_alignment(data)
    if recorded is not None:  # an aligned folder: its crops are what the model sees; the files are the sources
        if not teacher:
            _check_alignment(alignment, recorded["alignment"], data)
        records, root, crop_root = recorded["images"], Path(recorded["source"]), data
        unlabeled = bool(recorded.get("unlabeled", unlabeled))
    else:
        listing = list_image_folder(data, unlabeled=unlabeled)
        if not listing.samples:
            raise InputError(f"{data} has no photos" + ("" if unlabeled else " in identity sub-folders "
                                                        "(DATA/<identity>/<photo>)"))
        if not unlabeled:
            _check_identities(data, listing)
        root = crop_root = data
        if detect or alignment is not None or teacher:
            info = alignment or detection_only(multi)
            records, crop_root = _align_raw(data, work / "aligned", info, unlabeled, workers, progress)["images"], \
                work / "aligned"
        else:  # --no-detect: an unaligned model on photos as they are; no face checks
            records = [{"path": rel, "output": None} for rel, _ in listing.samples]
    files = [r["path"] for r in records]
    identities = ["" if unlabeled else f.split("/", 1)[0] for f in files]
    if alignment is None and not teacher:  # an unaligned model sees every readable original photo
        has = np.array([r.get("skip") != "unreadable" for r in records], bool)
        read_root, read_paths = root, [f for f, h in zip(files, has) if h]
        records = [r if "status" in r else None for r in records]
    else:  # an aligned model (and a teacher's contact sheet) sees the crop
        has = np.array([r["output"] is not None for r in records], bool)
        read_root, read_paths = crop_root, [r["output"] for r, h in zip(records, has) if h]
    crop_index = np.where(has, np.cumsum(has) - 1, -1)
    sha = [_sha256(root / f) for f in files] if root.is_dir() else [None] * len(files)
    meta = {"data": str(data), "root": str(root), "kind": "aligned folder" if recorded else "raw folder",
            "unlabeled": unlabeled}
    reader = _FolderReader(read_root, read_paths)
    return _photos(root, files, identities, records, crop_index, sha, reader, root if root.is_dir() else None,
                   meta), reader


def _from_shards(data: str | Path, alignment: Optional[dict],
                 check: bool = True) -> tuple[Photos, Callable[[int], Image.Image]]:
    """Every split of a shard folder (or URL); photos the alignment skipped (not in the shards) come from its record.
    ``check``: refuse crops aligned otherwise than ``alignment`` (a teacher brings its own preprocessing)."""
    meta = read_metadata(data)
    recorded = meta.get("alignment")
    if check:
        _check_alignment(alignment, recorded["info"] if recorded else None, data)
    by_output = _records_by(recorded["images"], "output") if recorded else {}
    splits = sorted(meta["splits"])
    keep, files, identities, records = [], [], [], []
    for s, split in enumerate(splits):
        ds = ShardDataset(data, split)
        for i, (path, label) in enumerate(zip(ds.paths, ds.labels)):
            record = by_output.get(path)
            keep.append((s, i))
            files.append(record["path"] if record else path)
            identities.append(ds.classes[int(label)])
            records.append(record)
    reader = _ShardReader(data, splits, keep)
    sha: list[Optional[str]] = [None] * len(keep)  # of the crops
    for k, raw in reader.iter_raw(range(len(keep))):
        sha[k] = hashlib.sha256(raw).hexdigest()
    skipped = [r for r in (recorded["images"] if recorded else []) if not r["output"]]
    files += [r["path"] for r in skipped]
    identities += [r["path"].split("/", 1)[0] for r in skipped]
    records += skipped
    sha += [None] * len(skipped)
    crop_index = np.r_[np.arange(len(keep)), -np.ones(len(skipped), np.int64)]
    root = Path(recorded["source"]) if recorded else Path(meta.get("source") or str(data))
    info = {"data": str(data), "root": str(root), "kind": "shards", "unlabeled": False, "splits": splits}
    photos = _photos(root, files, identities, records, crop_index, sha, reader, root if root.is_dir() else None, info)
    photos.stored = lambda i: reader.raw(int(crop_index[i])) if crop_index[i] >= 0 else None
    return photos, reader
