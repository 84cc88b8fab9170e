"""IJB-B / IJB-C template evaluation as the field runs it (insightface's eval_ijbc.py and ijb_1n.py).

The distributed layout (``IJBC/`` or ``IJBB/``; file names start with ``ijbc_`` or ``ijbb_``)::

    meta/ijbc_name_5pts_score.txt      image name, 10 landmark coordinates (x1 y1 ... x5 y5), faceness score
    meta/ijbc_face_tid_mid.txt         image name, template id, media id (one row per face of a template)
    meta/ijbc_template_pair_label.txt  template 1, template 2, label (1 = same subject): the 1:1 protocol
    meta/ijbc_1N_gallery_G1.csv, ..._G2.csv, ijbc_1N_probe_mixed.csv   (IJB-B: ..._S1.csv, ..._S2.csv)
                                       TEMPLATE_ID, SUBJECT_ID, FILENAME, ...: the 1:N protocol (optional)
    loose_crop/<image name>

The protocol: each crop is aligned by its 5 points onto the ArcFace 112x112 template (facesiam.faces.template); the
crop and its mirror image are embedded and the two embeddings summed (not re-normalised: eval_ijbc's F2 mode), then
multiplied by the faceness score (its detector-score mode, D1); faces are averaged per media (a video's frames or
one photo) and the media means summed per template, then L2-normalised. 1:1: cosine score of every listed template
pair, TAR at FAR 1e-6 ... 1e-1 (facesiam.eval.verification: the largest TAR with FAR <= the target). 1:N: each gallery
(G1, G2) against the mixed probes; a probe whose subject is in the gallery is mated, the others are non-mated (open
set, as NIST defines it): rank-k (CMC) over the mated probes, TPIR = 1 - FNIR at FPIR 1e-2 and 1e-1
(facesiam.eval.identification's definitions).

Where the numbers can differ from insightface's scripts: a facesiam model outputs unit embeddings, so the feature norm
insightface keeps as a quality weight (its N1 mode) is not there; insightface's table reads TAR at the ROC point
*nearest* each FAR (which may lie above it); its ijb_1n.py merges G1 and G2 into one closed-set gallery and reports a
"FAR" over all probe-gallery impostor scores, where this module follows NIST's open-set TPIR@FPIR per gallery (and
reports the mean of G1 and G2, as papers do).

Embedding ~470,000 crops takes a while: embeddings are cached in chunks (``OUT/ijb_cache/<name>-<fingerprint>/``,
each written atomically), so a killed run continues where it stopped; the fingerprint covers the model's weights, the
landmark file and the crop size, so another model never reads them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import InputError, and_more
from ..fileio import atomic_write, sha256_file, write_json, write_text

log = logging.getLogger("facesiam.eval")

NAMES = ("ijbc", "ijbb")
TITLES = {"ijbc": "IJB-C", "ijbb": "IJB-B"}
GALLERIES = (("G1", "S1"), ("G2", "S2"))  # the two 1:N galleries: IJB-C calls them G1/G2, IJB-B S1/S2
TPIR_FPIR = (1e-2, 1e-1)                   # the 1:N operating points the field reports
CMC_REPORTED = (1, 5, 10)
CHUNK_SIZE = 8192                          # crops per cache file: a killed run loses at most one chunk's work
CACHE_VERSION = 1
SCORE_BLOCK = 16_384                       # template pairs scored at a time (bounded memory at 15.6M pairs)


# ---------------------------------------------------------------------------------------------------- the layout

@dataclass
class IJBLayout:
    """What the meta files of an IJB-B/IJB-C folder say, after leaving out their bad rows (``problems``)."""

    root: Path
    name: str                    # "ijbc" or "ijbb"
    images: list[str]            # crop file names under loose_crop/, in the landmark file's order
    landmarks: np.ndarray        # N x 5 x 2 float64, pixel-index coordinates of the crop
    scores: np.ndarray           # N faceness scores (float64)
    face_image: np.ndarray       # per face row of the template file: image index (int64)
    face_template: np.ndarray    # ... template id
    face_media: np.ndarray       # ... media id
    pair_t1: np.ndarray          # 1:1 pairs: template ids and labels (1 = same subject)
    pair_t2: np.ndarray
    pair_label: np.ndarray
    pair_line: np.ndarray        # the line of the pairs file each pair comes from (1-based)
    galleries: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # G1/G2: (templates, subjects)
    probes: Optional[tuple[np.ndarray, np.ndarray]] = None                            # the mixed probes
    problems: dict[str, list[InputError]] = field(default_factory=dict)               # bad rows, by file name

    @property
    def title(self) -> str:
        return TITLES[self.name]

    @property
    def crops(self) -> Path:
        return self.root / "loose_crop"

    def meta(self, suffix: str) -> Path:
        return self.root / "meta" / f"{self.name}_{suffix}"


class _Rows:
    """The bad rows of one file: a one-line InputError each (file and line number), reported together."""

    def __init__(self, path: Path):
        self.path, self.bad = path, []

    def bad_row(self, line: int, what: str) -> None:
        self.bad.append(InputError(f"{self.path} line {line}: {what}"))

    def finish(self, good: int, fix: str) -> list[InputError]:
        """Warn about the bad rows (the first, and how many more); raise when no row is usable."""
        if good == 0:
            first = f"{self.bad[0]}{and_more(self.bad)}" if self.bad else f"{self.path}: no rows"
            raise InputError(f"{first}; no usable row in {self.path.name}: {fix}")
        if self.bad:
            log.warning("%s%s; left out (%d of %d rows)", self.bad[0], and_more(self.bad), len(self.bad),
                        len(self.bad) + good)
        return self.bad


def _lines(path: Path):
    """(line number, fields) of each non-blank line (whitespace-separated)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if fields:
                yield number, fields


def detect_name(root: str | os.PathLike) -> str:
    """"ijbc" or "ijbb": which data set ROOT holds (by its meta/*_face_tid_mid.txt)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder; pass the IJB-C (or IJB-B) folder that holds meta/ and loose_crop/")
    found = [n for n in NAMES if (root / "meta" / f"{n}_face_tid_mid.txt").is_file()]
    if len(found) != 1:
        what = ("both ijbc_ and ijbb_ meta files" if found
                else "no meta/ijbc_face_tid_mid.txt or meta/ijbb_face_tid_mid.txt")
        raise InputError(f"{root}: {what}; pass the IJB-C or IJB-B folder itself (it holds meta/ and loose_crop/, "
                         "as insightface distributes them)")
    return found[0]


def read_ijb(root: str | os.PathLike, name: Optional[str] = None) -> IJBLayout:
    """Read an IJB-B/IJB-C folder's meta files. Bad rows are left out with a warning (one line each, file and line
    number, collected: the first is shown with how many more); a file without a single usable row is an InputError."""
    root = Path(root)
    name = name or detect_name(root)
    problems: dict[str, list[InputError]] = {}
    layout = IJBLayout(root, name, [], np.zeros((0, 5, 2)), np.zeros(0), *(np.zeros(0, np.int64),) * 7)
    if not layout.crops.is_dir():
        raise InputError(f"{layout.crops}: no such folder; the crops of {layout.title} live in ROOT/loose_crop/")

    # Landmarks and faceness scores, one row per crop.
    path = layout.meta("name_5pts_score.txt")
    rows, index, marks = _Rows(path), {}, []
    for number, fields in _lines(_existing(path)):
        if len(fields) != 12:
            rows.bad_row(number, f"{len(fields)} fields, expected 12 (image name, 10 landmark coordinates, score)")
            continue
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError:
            rows.bad_row(number, f"a landmark or the score is not a number: {' '.join(fields[1:])!r}")
            continue
        if not all(map(math.isfinite, values)):
            rows.bad_row(number, "a landmark or the score is not finite")
        elif fields[0] in index:
            rows.bad_row(number, f"image {fields[0]} is listed twice (first on line {index[fields[0]][1]})")
        else:
            index[fields[0]] = (len(marks), number)
            marks.append(values)
    problems[path.name] = rows.finish(len(marks), "each line is: image name, x1 y1 ... x5 y5, faceness score")
    layout.images = list(index)
    values = np.array(marks, np.float64).reshape(-1, 11)
    layout.landmarks, layout.scores = values[:, :10].reshape(-1, 5, 2), values[:, 10].copy()

    # Faces of each template: image, template id, media id.
    path = layout.meta("face_tid_mid.txt")
    rows, faces = _Rows(path), []
    for number, fields in _lines(_existing(path)):
        if len(fields) != 3:
            rows.bad_row(number, f"{len(fields)} fields, expected 3 (image name, template id, media id)")
        elif fields[0] not in index:
            rows.bad_row(number, f"image {fields[0]} has no landmarks in {layout.meta('name_5pts_score.txt').name}")
        else:
            try:
                faces.append((index[fields[0]][0], int(fields[1]), int(fields[2])))
            except ValueError:
                rows.bad_row(number, f"template and media ids must be integers, got {fields[1]!r} {fields[2]!r}")
    problems[path.name] = rows.finish(len(faces), "each line is: image name, template id, media id")
    layout.face_image, layout.face_template, layout.face_media = np.array(faces, np.int64).reshape(-1, 3).T

    # 1:1 template pairs.
    path = layout.meta("template_pair_label.txt")
    pairs, lines, bad = _read_pairs(_existing(path))
    layout.pair_t1, layout.pair_t2, layout.pair_label = pairs.T
    layout.pair_line = lines
    problems[path.name] = bad

    # 1:N: two galleries and the mixed probes, when present.
    for names in GALLERIES:
        found = [p for p in (layout.meta(f"1N_gallery_{n}.csv") for n in names) if p.is_file()]
        if found:
            layout.galleries[names[0]], problems[found[0].name] = _read_subjects(found[0])
    probe_path = layout.meta("1N_probe_mixed.csv")
    if probe_path.is_file():
        layout.probes, problems[probe_path.name] = _read_subjects(probe_path)
    layout.problems = {k: v for k, v in problems.items() if v}
    return layout


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise InputError(f"{path}: not found; an IJB folder holds meta/{path.name} (insightface's IJB layout)")
    return path


def _read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray, list[InputError]]:
    """(pairs P x 3 int64, their line numbers, bad rows) of a pairs file: ``t1 t2 label`` per line.

    IJB-C lists 15.6 million pairs: NumPy's C parser reads a clean file; the rows of a file it rejects are parsed one
    by one to name each bad row.
    """
    rows = _Rows(path)
    try:
        pairs = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
        if pairs.shape[1] != 3:
            raise ValueError("not 3 columns")
        lines = np.arange(1, len(pairs) + 1)
        if len(pairs) != _count_lines(path):  # loadtxt skips blank lines: number the rows as the file does
            raise ValueError("blank lines")
    except ValueError:
        good, numbers = [], []
        for number, fields in _lines(path):
            if len(fields) != 3:
                rows.bad_row(number, f"{len(fields)} fields, expected 3 (template 1, template 2, label)")
                continue
            try:
                good.append([int(v) for v in fields])
                numbers.append(number)
            except ValueError:
                rows.bad_row(number, f"template ids and label must be integers, got {' '.join(fields)!r}")
        pairs, lines = np.array(good, np.int64).reshape(-1, 3), np.array(numbers, np.int64)
    wrong = ~np.isin(pairs[:, 2], (0, 1))
    for k in np.flatnonzero(wrong)[:1000]:  # naming a thousand is plenty; and_more counts them all
        rows.bad_row(int(lines[k]), f"label {pairs[k, 2]}, expected 1 (same subject) or 0")
    if wrong.sum() > 1000:
        rows.bad.extend(InputError(f"{path} line {int(lines[k])}: bad label") for k in np.flatnonzero(wrong)[1000:])
    pairs, lines = pairs[~wrong], lines[~wrong]
    bad = rows.finish(len(pairs), "each line is: template id, template id, label (1 same subject, 0 not)")
    return pairs, lines, bad


def _count_lines(path: Path) -> int:
    """Lines in a file (a last line without a newline counts), read in 1 MiB blocks."""
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            count, last = count + block.count(b"\n"), block[-1:]
    return count + (last != b"\n")


def _read_subjects(path: Path) -> tuple[tuple[np.ndarray, np.ndarray], list[InputError]]:
    """((template ids, subject ids), bad rows) of a 1:N csv (TEMPLATE_ID, SUBJECT_ID, FILENAME, ...), one template
    per entry (the csv has a row per file)."""
    rows, subject, seen = _Rows(path), {}, {}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        header = [h.strip().upper() for h in next(reader, [])]
        if "TEMPLATE_ID" not in header or "SUBJECT_ID" not in header:
            raise InputError(f"{path} line 1: no TEMPLATE_ID and SUBJECT_ID columns in the header {header[:4]}; "
                             "the 1:N csv files start with TEMPLATE_ID,SUBJECT_ID,FILENAME,...")
        t_col, s_col = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
        for number, fields in enumerate(reader, 2):
            if not any(v.strip() for v in fields):
                continue
            try:
                template, subj = int(fields[t_col]), int(fields[s_col])
            except (ValueError, IndexError):
                rows.bad_row(number, "TEMPLATE_ID and SUBJECT_ID must be integers")
                continue
            if subject.setdefault(template, subj) != subj:
                rows.bad_row(number, f"template {template} has subject {subj} here but {subject[template]} on line "
                                     f"{seen[template]}")
            seen.setdefault(template, number)
    bad = rows.finish(len(subject), "each row is: TEMPLATE_ID, SUBJECT_ID, FILENAME, ...")
    templates = np.array(sorted(subject), np.int64)
    return (templates, np.array([subject[t] for t in templates.tolist()], np.int64)), bad


# ---------------------------------------------------------------------------------------------------- embedding

def _crop(folder: Path, name: str, landmarks: np.ndarray, size: int):
    """(the crop aligned onto the template, None) or (None, why it cannot be used: one line naming the file)."""
    from ..data.images import load_rgb
    from ..faces.template import estimate_transform, warp

    path = folder / name
    try:
        return warp(load_rgb(path), estimate_transform(landmarks, size), size), None
    except (InputError, OSError, ValueError) as err:
        return None, f"{path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"


class _CropPairs:
    """Item 2k: crop ``rows[k]`` aligned onto the template, item 2k + 1: its mirror image, each as the model's input
    tensor with label 1; a crop that cannot be used gives a zero tensor and label 0. Read in the loader workers."""

    def __init__(self, layout: IJBLayout, rows: range, size: int, transform: Any):
        self.folder, self.names, self.landmarks = layout.crops, layout.images, layout.landmarks
        self.rows, self.size, self.transform = rows, size, transform
        self._last: tuple = (-1, None)  # the crop last read: its mirror comes next, in the same batch

    def __len__(self) -> int:
        return 2 * len(self.rows)

    def __getitem__(self, item: int):
        from PIL import Image, ImageOps

        i = self.rows[item // 2]
        if self._last[0] != i:
            self._last = (i, _crop(self.folder, self.names[i], self.landmarks[i], self.size)[0])
        crop = self._last[1]
        if crop is None:
            return self.transform(Image.new("RGB", (self.size, self.size))) * 0, 0
        return self.transform(ImageOps.mirror(crop) if item % 2 else crop), 1


def cache_dir_for(layout: IJBLayout, out_dir: str | os.PathLike, model_id: str, size: int,
                  chunk_size: int = CHUNK_SIZE) -> Path:
    """Where the embeddings of this model on this layout are cached (a fingerprint of both)."""
    key = {"version": CACHE_VERSION, "model": model_id, "landmarks": sha256_file(layout.meta("name_5pts_score.txt")),
           "size": size, "chunk_size": chunk_size, "embedding": "crop + mirror, summed"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(out_dir) / "ijb_cache" / f"{layout.name}-{digest}"


def embed_crops(layout: IJBLayout, model: Any, transform: Any, cache: str | os.PathLike, *, size: int = 112,
                chunk_size: int = CHUNK_SIZE, batch_size: int = 128, num_workers: int = 0,
                progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features N x D float32, usable N bool, failures) for every crop of ``layout``, in its order.

    A crop's feature is model(crop) + model(mirrored crop), both unit vectors (the sum is not re-normalised);
    ``transform`` turns an aligned PIL crop into the model's input tensor. The crops go through facesiam's one
    embedding loop (facesiam.eval.embed.embed_dataset), a chunk of ``chunk_size`` crops at a time; each chunk is
    cached in ``cache`` when complete (atomic writes) and read, not embedded again, by a later run. A crop that
    cannot be read or aligned is not usable (its row is zero) and named in ``failures``.
    """
    from tqdm.auto import tqdm

    from .embed import embed_dataset

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    n = len(layout.images)
    starts = list(range(0, n, chunk_size))
    parts: dict[int, tuple[np.ndarray, np.ndarray, list[str]]] = {}
    for k, start in enumerate(starts):
        got = _read_chunk(cache / f"chunk-{k:05d}.npz", min(chunk_size, n - start))
        if got is not None:
            parts[k] = got
    todo = [k for k in range(len(starts)) if k not in parts]
    if parts:
        log.info("%s: %d of %d chunks of embeddings cached in %s; embedding the other %d", layout.title, len(parts),
                 len(starts), cache, len(todo))
    done, t0 = sum(len(p[1]) for p in parts.values()), time.time()
    with tqdm(total=n, initial=done, desc=f"embed {layout.title}", unit="crop", disable=not progress or not todo,
              dynamic_ncols=True) as bar:
        for k in todo:
            rows = range(starts[k], min(starts[k] + chunk_size, n))
            # An even batch keeps each crop and its mirror in one batch, so one worker reads the photo once.
            emb, ok = embed_dataset(model, _CropPairs(layout, rows, size, transform), batch_size=2 * batch_size,
                                    num_workers=num_workers, flip=False, progress=False)
            usable = ok[0::2] == 1
            # Why a crop failed is asked again here (rare): the loop carries only tensors and labels.
            failed = [_crop(layout.crops, layout.images[i], layout.landmarks[i], size)[1]
                      or f"{layout.crops / layout.images[i]}: could not be read" for i in np.asarray(rows)[~usable]]
            feats = np.where(usable[:, None], emb[0::2] + emb[1::2], 0).astype(np.float32)
            _write_chunk(cache / f"chunk-{k:05d}.npz", feats, usable, failed)
            parts[k] = (feats, usable, failed)
            bar.update(len(rows))
    if todo:
        log.info("%s: embedded %d crops in %.0fs (%.0f crops/s, with their mirror images)", layout.title, n - done,
                 time.time() - t0, (n - done) / max(time.time() - t0, 1e-9))
    if not starts:
        return np.zeros((0, 0), np.float32), np.zeros(0, bool), []
    feats = np.concatenate([parts[k][0] for k in range(len(starts))])
    usable = np.concatenate([parts[k][1] for k in range(len(starts))])
    failures = [why for k in range(len(starts)) for why in parts[k][2]]
    if failures:
        log.warning("%s: %d crop(s) could not be used: %s%s", layout.title, len(failures), failures[0],
                    and_more(failures))
    return feats, usable, failures


def _write_chunk(path: Path, feats: np.ndarray, ok: np.ndarray, failed: list[str]) -> None:
    with atomic_write(path, "wb") as f:
        np.savez(f, features=feats, ok=ok, failed=np.asarray(failed, dtype=str))


def _read_chunk(path: Path, rows: int) -> Optional[tuple[np.ndarray, np.ndarray, list[str]]]:
    """A cached chunk, or None when it is absent or does not fit (then it is embedded again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            feats, ok, failed = z["features"], z["ok"], z["failed"].tolist()
    except (OSError, ValueError, KeyError) as err:
        log.warning("%s: unreadable cached chunk (%s); embedding it again", path, err)
        return None
    if feats.ndim != 2 or len(feats) != rows or ok.shape != (rows,):
        log.warning("%s: cached chunk of shape %s, expected %d rows; embedding it again", path, feats.shape, rows)
        return None
    return feats.astype(np.float32, copy=False), ok.astype(bool), failed


# ---------------------------------------------------------------------------------------------------- pooling

def pool_templates(features: np.ndarray, weights: np.ndarray, face_image: np.ndarray, face_template: np.ndarray,
                   face_media: np.ndarray, usable: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(template ids, unit template features): per face row weighted image features, averaged per (template, media),
    the media means summed per template, L2-normalised (insightface's image2template_feature).

    ``weights``: per image (the faceness score); ``usable``: per image, False leaves the image out (its media mean
    is over the others; a template with no usable image is left out).
    """
    from scipy import sparse

    keep = np.ones(len(face_image), bool) if usable is None else np.asarray(usable, bool)[face_image]
    img, tmpl, media = face_image[keep], face_template[keep], face_media[keep]
    templates, t_index = np.unique(tmpl, return_inverse=True)
    _, m_index, m_count = np.unique(np.stack([tmpl, media], 1), axis=0, return_inverse=True, return_counts=True)
    m_index = m_index.reshape(-1)
    # One sparse (templates x images) matrix does both steps: face r adds weight / (faces in its media) of its
    # image to its template. Written with scipy.sparse because no library pools by two keys at once.
    dtype = features.dtype if features.dtype in (np.float32, np.float64) else np.float64  # no copy of 470k x 512
    pool = sparse.csr_matrix(((np.asarray(weights, np.float64)[img] / m_count[m_index]).astype(dtype),
                              (t_index, img)), shape=(len(templates), len(features)))
    pooled = np.asarray(pool @ features.astype(dtype, copy=False), np.float64)
    norm = np.linalg.norm(pooled, axis=1, keepdims=True)
    return templates, pooled / np.where(norm > 0, norm, 1.0)


def _lookup(templates: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row of each wanted template id in the sorted ``templates``, -1 where absent."""
    pos = np.clip(np.searchsorted(templates, wanted), 0, max(len(templates) - 1, 0))
    found = (templates[pos] == wanted) if len(templates) else np.zeros(len(wanted), bool)
    return np.where(found, pos, -1)


# ---------------------------------------------------------------------------------------------------- metrics

def verify_pairs(templates: np.ndarray, feats: np.ndarray, t1: np.ndarray, t2: np.ndarray,
                 label: np.ndarray) -> tuple[dict, np.ndarray]:
    """(1:1 metrics, score per pair: NaN where a template has no feature) of template pairs.

    The metrics are facesiam.eval.verification.score_metrics' (exact ROC with scikit-learn; TAR at FAR 1e-6..1e-1:
    the largest TAR at FAR <= the target, None with fewer than 1/FAR impostor pairs), plus the pair counts.
    """
    from .verification import score_metrics

    a, b = _lookup(templates, t1), _lookup(templates, t2)
    known = (a >= 0) & (b >= 0)
    scores = np.full(len(t1), np.nan)
    ka, kb = a[known], b[known]
    single = np.asarray(feats, np.float32)  # half the memory traffic of gathering 2 x 15.6M rows; cosines to 1e-7
    out = np.empty(len(ka))
    for s in range(0, len(ka), SCORE_BLOCK):
        out[s:s + SCORE_BLOCK] = np.einsum("ij,ij->i", single[ka[s:s + SCORE_BLOCK]], single[kb[s:s + SCORE_BLOCK]])
    scores[known] = out
    metrics = score_metrics(out, np.asarray(label)[known] == 1)
    metrics.update({"n_pairs": int(len(t1)), "n_pairs_scored": int(known.sum()),
                    "n_pairs_missing_template": int((~known).sum())})
    return metrics, scores


class _ExactRanks:
    """What facesiam.eval.identification.identification_summary reads from a score pass's neighbour store, computed
    exactly from a probe x gallery score matrix (the 1:N protocol's probes and gallery are given, not drawn)."""

    def __init__(self, own: np.ndarray, beaten_by: np.ndarray, best: np.ndarray):
        self.own, self.beaten_by, self.best = own, beaten_by, best

    def ranks(self, probes: np.ndarray) -> np.ndarray:
        from .neighbours import CMC_RANKS

        return np.minimum(self.beaten_by[probes], CMC_RANKS) + 1

    def own_scores(self, probes: np.ndarray) -> np.ndarray:
        return self.own[probes]

    def best_gallery_scores(self, probes: np.ndarray) -> np.ndarray:
        return self.best[probes]

    def map_at_r(self) -> None:
        return None


def identify(probe_feats: np.ndarray, probe_subjects: np.ndarray, gallery_feats: np.ndarray,
             gallery_subjects: np.ndarray) -> dict:
    """Open-set 1:N of probe templates against a gallery: rank-k/CMC over the mated probes (subject in the gallery),
    FNIR/TPIR at FPIR from the non-mated probes' best gallery scores (facesiam.eval.identification's definitions).

    A subject with several gallery templates scores by its best one; rank = 1 + the gallery subjects that score
    strictly above the probe's own.
    """
    from .identification import identification_summary
    from .score_pass import PassResult
    from .verification import far_key

    subjects, g_index = np.unique(gallery_subjects, return_inverse=True)
    mated = np.isin(probe_subjects, subjects)
    own_col = np.searchsorted(subjects, probe_subjects)
    own = np.full(len(probe_subjects), -np.inf)
    beaten_by = np.zeros(len(probe_subjects), np.int64)
    best = np.full(len(probe_subjects), -np.inf)
    order = np.argsort(g_index, kind="stable")
    cuts = np.flatnonzero(np.r_[True, g_index[order][1:] != g_index[order][:-1]])
    for s in range(0, len(probe_feats), 4096):
        scores = probe_feats[s:s + 4096] @ gallery_feats[order].T
        per_subject = np.maximum.reduceat(scores, cuts, axis=1) if len(cuts) else scores
        best[s:s + 4096] = per_subject.max(axis=1) if per_subject.shape[1] else -np.inf
        rows = np.flatnonzero(mated[s:s + 4096])
        mine = per_subject[rows, own_col[s + rows]]
        own[s + rows] = mine
        beaten_by[s + rows] = np.sum(per_subject[rows] > mine[:, None], axis=1)
    nonmated = np.flatnonzero(~mated)
    split = (np.arange(len(subjects)), np.flatnonzero(mated), nonmated, np.unique(probe_subjects[nonmated]))
    result = PassResult(None, _ExactRanks(own, beaten_by, best), np.arange(len(probe_subjects)))
    out = identification_summary(result, split, unenrolled=len(nonmated), map_at_r=False)
    out.pop("map_at_r", None)
    out.pop("unenrolled_identities", None)
    out["n_gallery_templates"] = int(len(gallery_subjects))
    out["n_nonmated_probes"], out["n_mated_probes"] = int(len(nonmated)), int(mated.sum())
    cmc = out.get("cmc") or []
    for r in CMC_REPORTED:
        out[f"rank{r}"] = cmc[r - 1] if len(cmc) >= r else None
    fnir = out.get("fnir_at_fpir") or {}
    out["tpir_at_fpir"] = ({k: (None if v is None else 1.0 - v) for k, v in fnir.items()} if fnir
                           else {far_key(t): None for t in TPIR_FPIR})  # no non-mated probe: no FPIR
    return out


# ---------------------------------------------------------------------------------------------------- the whole run

def evaluate_ijb(root: str | os.PathLike, model: Any, transform: Any, out_dir: str | os.PathLike, *, model_id: str,
                 alignment: Optional[dict] = None, name: Optional[str] = None, chunk_size: int = CHUNK_SIZE,
                 batch_size: int = 128, num_workers: int = 0, progress: bool = True,
                 source: Optional[dict] = None) -> dict:
    """Embed (resumably), pool and score an IJB-B/IJB-C folder with ``model`` (a torch module: input tensors from
    ``transform`` of an aligned PIL crop -> unit embeddings) whose weights ``model_id`` identifies (the cache's
    key); ``alignment``: the model's (its crop size is used). Returns the metrics dict (``write_ijb_report``
    writes it) and saves the per-pair scores as OUT/<name>_pair_scores.npz (line, label, score)."""
    t0 = time.time()
    layout = read_ijb(root, name)
    size = int((alignment or {}).get("size", 112))
    if not alignment:
        log.warning("the model records no face alignment: IJB crops are aligned onto the ArcFace template anyway")
    timing: dict[str, float] = {"read": time.time() - t0}
    cache = cache_dir_for(layout, out_dir, model_id, size, chunk_size)
    write_json(cache / "manifest.json", {"model": model_id, "data": str(layout.root), "size": size,
                                         "chunk_size": chunk_size, "images": len(layout.images)})
    t1 = time.time()
    feats, usable, failures = embed_crops(layout, model, transform, cache, size=size, chunk_size=chunk_size,
                                          batch_size=batch_size, num_workers=num_workers, progress=progress)
    timing["embed"] = time.time() - t1
    if len(usable) and not usable.any():
        raise InputError(f"{layout.crops}: none of the {len(usable):,} crops could be used: {failures[0]}"
                         f"{and_more(failures)}; pass the folder that holds meta/ and loose_crop/ with its images")
    t2 = time.time()
    templates, tfeats = pool_templates(feats, layout.scores, layout.face_image, layout.face_template,
                                       layout.face_media, usable)
    all_templates = np.unique(layout.face_template)
    verification, scores = verify_pairs(templates, tfeats, layout.pair_t1, layout.pair_t2, layout.pair_label)
    if verification["n_pairs_missing_template"]:
        log.warning("%s: %d pair(s) name a template without a usable face; they are not scored", layout.title,
                    verification["n_pairs_missing_template"])
    with atomic_write(Path(out_dir) / f"{layout.name}_pair_scores.npz", "wb") as f:
        np.savez(f, line=layout.pair_line.astype(np.int64), label=layout.pair_label.astype(np.int8),
                 score=scores.astype(np.float32))
    timing["verification"] = time.time() - t2
    result: dict[str, Any] = {
        "dataset": layout.title, "root": str(layout.root), "n_images": len(layout.images),
        "n_images_unusable": int((~usable).sum()), "n_faces": int(len(layout.face_image)),
        "n_templates": int(len(all_templates)), "n_templates_pooled": int(len(templates)),
        "n_media": int(len(np.unique(np.stack([layout.face_template, layout.face_media], 1), axis=0))),
        "bad_rows": {k: len(v) for k, v in layout.problems.items()},
        "unusable_images": failures[:20],
        "protocol": {"alignment": f"5 landmarks onto the ArcFace {size}x{size} template",
                     "flip": "crop + mirror, summed",
                     "weights": "faceness score", "pooling": "mean per media, sum per template, L2-normalised",
                     "tar_at_far": "largest TAR with FAR <= target"},
        "verification": verification,
    }
    t3 = time.time()
    if layout.probes is not None and layout.galleries:
        ident = {}
        probe_rows = _lookup(templates, layout.probes[0])
        if (probe_rows < 0).any():
            log.warning("%s: %d probe template(s) have no usable face; left out", layout.title,
                        int((probe_rows < 0).sum()))
        for gname, (g_templates, g_subjects) in layout.galleries.items():
            g_rows = _lookup(templates, g_templates)
            if (g_rows < 0).any():
                log.warning("%s: %d %s gallery template(s) have no usable face; left out", layout.title,
                            int((g_rows < 0).sum()), gname)
            ident[gname] = identify(tfeats[probe_rows[probe_rows >= 0]], layout.probes[1][probe_rows >= 0],
                                    tfeats[g_rows[g_rows >= 0]], g_subjects[g_rows >= 0])
        if len(ident) > 1:  # papers report the mean of the two galleries
            mean = lambda vals: None if any(v is None for v in vals) else float(np.mean(vals))  # noqa: E731
            ident["mean"] = {**{f"rank{r}": mean([g[f"rank{r}"] for g in ident.values()]) for r in CMC_REPORTED},
                             "tpir_at_fpir": {k: mean([g["tpir_at_fpir"].get(k) for g in ident.values()])
                                              for k in next(iter(ident.values()))["tpir_at_fpir"]}}
        result["identification"] = ident
    elif layout.probes is not None or layout.galleries:
        log.warning("%s: 1:N needs the two gallery csvs and the mixed probe csv; only some are present, 1:N skipped",
                    layout.title)
    timing["identification"] = time.time() - t3
    result["timing"] = timing
    result["source"] = {**(source or {}), "model_id": model_id, "cache": str(cache)}
    return result


# ---------------------------------------------------------------------------------------------------- the report

def write_ijb_report(result: dict, out_dir: str | os.PathLike, key: Optional[str] = None) -> dict[str, Path]:
    """Add ``result`` to OUT/metrics.json under ``key`` (ijbc / ijbb; other entries kept), draw OUT/<key>_roc.png,
    and put the section into OUT/report.md (replacing an earlier one of the same key). Returns {figure: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = key or next(k for k, v in TITLES.items() if v == result["dataset"])
    metrics_path = out / "metrics.json"
    metrics: dict = {}
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s is not valid JSON; writing a new one", metrics_path)
    metrics[key] = result
    write_json(metrics_path, metrics)
    figures = {}
    try:
        figures["roc"] = _roc_png(result, out / f"{key}_roc.png")
    except Exception as err:  # noqa: BLE001 -- a figure never costs the numbers
        log.warning("figure %s_roc could not be drawn (%s: %s)", key, type(err).__name__, err)
    _write_section(out / "report.md", key, _section(result, figures))
    return figures


def _roc_png(result: dict, path: Path) -> Path:
    from .plots import plt, roc_figure

    v = result["verification"]
    fig = roc_figure({"verification": v})
    ax = fig.axes[0]
    auc = v.get("auc")
    ax.lines[0].set_label(f"{result['dataset']} 1:1 templates" + (f" (AUC {auc:.4f})" if auc is not None else ""))
    ax.legend(loc="lower right")
    ax.set_title(f"ROC: {result['dataset']} 1:1 template verification")
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path


def _section(result: dict, figures: dict[str, Path]) -> str:
    from .report import fmt
    from .verification import FAR_TARGETS, far_key

    v, title = result["verification"], result["dataset"]
    lines = [f"## {title}", "",
             f"`{result['root']}`: {result['n_images']:,} crops ({result['n_images_unusable']:,} unusable), "
             f"{result['n_templates']:,} templates, {result['n_media']:,} media. Crops aligned by their 5 landmarks, "
             "crop + mirror embeddings summed, weighted by the faceness score, averaged per media, summed per "
             "template, L2-normalised (insightface's eval_ijbc.py); TAR@FAR is the largest TAR at FAR <= the target "
             "(insightface's table takes the ROC point nearest the target instead).", ""]
    if result.get("bad_rows"):
        lines += ["Rows left out: " + ", ".join(f"{k} {n:,}" for k, n in result["bad_rows"].items()) + ".", ""]
    lines += [f"### 1:1 verification ({fmt(v['n_genuine'])} genuine, {fmt(v['n_impostor'])} impostor template pairs)",
              "", "| " + " | ".join(f"TAR@FAR={far_key(t)}" for t in sorted(FAR_TARGETS)) + " | AUC |",
              "|" + "---|" * (len(FAR_TARGETS) + 1),
              "| " + " | ".join(fmt(v["tar_at_far"][far_key(t)]) for t in sorted(FAR_TARGETS))
              + f" | {fmt(v['auc'], 5)} |", ""]
    if v.get("n_pairs_missing_template"):
        lines += [f"{v['n_pairs_missing_template']:,} pairs name a template without a usable face: not scored.", ""]
    if "roc" in figures:
        lines += [f"![{title} ROC]({figures['roc'].name})", ""]
    ident = result.get("identification")
    if ident:
        keys = [far_key(t) for t in TPIR_FPIR]
        lines += ["### 1:N identification (mixed probes, open set)", "",
                  "| gallery | templates | mated / non-mated probes | rank-1 | rank-5 | rank-10 | "
                  + " | ".join(f"TPIR@FPIR={k}" for k in keys) + " |", "|" + "---|" * (6 + len(keys))]
        for gname, g in ident.items():
            counts = ("" if gname == "mean" else f"{g['n_gallery_templates']:,}")
            probes = "" if gname == "mean" else f"{g['n_mated_probes']:,} / {g['n_nonmated_probes']:,}"
            lines.append(f"| {gname} | {counts} | {probes} | {fmt(g['rank1'])} | {fmt(g['rank5'])} | "
                         f"{fmt(g['rank10'])} | " + " | ".join(fmt(g["tpir_at_fpir"].get(k)) for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def _write_section(path: Path, key: str, text: str) -> None:
    """Put ``text`` between this key's markers in report.md, replacing an earlier one; other content is kept."""
    begin, end = f"<!-- {key}: begin -->", f"<!-- {key}: end -->"
    old = path.read_text(encoding="utf-8") if path.is_file() else "# facesiam evaluation report\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    write_text(path, new)


def run_checkpoint(checkpoint: str | os.PathLike, root: str | os.PathLike, out_dir: str | os.PathLike, *,
                   batch_size: int = 128, num_workers: int = 0, device: Optional[str] = None,
                   command: Optional[str] = None) -> dict:
    """The ``evaluate --checkpoint RUN/final --ijb DIR --out REPORT`` path: embed with the exported model, evaluate,
    write the report entries; returns the result."""
    from ..device import resolve_device
    from ..model import WEIGHTS_FILE, _export_dir, eval_transform_for, exported_alignment, load_exported

    export = _export_dir(checkpoint)
    model, cfg = load_exported(export, device=resolve_device(device))
    result = evaluate_ijb(root, model, eval_transform_for(cfg), out_dir, model_id=sha256_file(export / WEIGHTS_FILE),
                          alignment=exported_alignment(export), batch_size=batch_size, num_workers=num_workers,
                          source={"checkpoint": str(checkpoint), "command": command, "backbone": cfg.backbone,
                                  "embedding_dim": cfg.embedding_dim})
    write_ijb_report(result, out_dir)
    return result


def summary(result: dict) -> str:
    """One log line: the headline numbers."""
    from .report import fmt

    v = result["verification"]["tar_at_far"]
    parts = [f"{result['dataset']}: {result['n_images']:,} crops, {result['n_templates']:,} templates",
             "TAR@FAR " + ", ".join(f"{k} {fmt(v[k])}" for k in ("1e-05", "1e-04", "1e-03"))]
    for gname, g in (result.get("identification") or {}).items():
        parts.append(f"1:N {gname} rank-1 {fmt(g['rank1'])}, TPIR@FPIR=1e-02 {fmt(g['tpir_at_fpir'].get('1e-02'))}")
    return "; ".join(parts)


__all__ = ["IJBLayout", "read_ijb", "detect_name", "embed_crops", "pool_templates", "verify_pairs", "identify",
           "evaluate_ijb", "write_ijb_report", "run_checkpoint", "cache_dir_for", "summary"]
