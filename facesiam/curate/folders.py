"""The cluster job: unlabelled photos -> FOLDERS/person_0001/ ... + FOLDERS/unsure/, as symbolic links to the
photos (or copies; the photos themselves never move), clusters.csv, report.html/.md with a contact sheet per
cluster, and cluster.json (settings, counts and, given the true identities, the scores).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import InputError, and_more
from ..data.folder import check_destination
from ..data.remote import is_remote
from ..fileio import staged_directory, write_json, write_text
from .cluster import UNSURE, cluster_embeddings, cluster_scores
from .photos import Photos, TeacherPass, load_photos
from .sheets import Sheet, caption, write_sheets

log = logging.getLogger("facesiam.curate")

SHEET_PHOTOS = 12  # photos per cluster on its contact sheet
MARKER = "cluster.json"


def read_truth(spec: str, photos: Photos) -> list[str]:
    """True identity per photo: "parent" (the photo's folder name) or a CSV file of ``path,identity`` rows
    (paths relative to PHOTOS; a header row is allowed)."""
    if spec == "parent":
        return [f.rsplit("/", 1)[0] if "/" in f else "" for f in photos.files]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"truth file {path} not found; give a CSV of path,identity rows or 'parent'")
    table = {}
    for row in csv.reader(io.StringIO(path.read_text(encoding="utf-8"))):
        if len(row) >= 2:
            table[row[0].strip()] = row[1].strip()
    missing = [f for f in photos.files if f not in table]
    if missing:
        raise InputError(f"{path} gives no identity for {missing[0]}{and_more(missing)}; list every photo as path,identity")
    return [table[f] for f in photos.files]


def _link(src: Path, dst: Path, copy: bool) -> None:
    if copy:
        shutil.copy2(src, dst)
    else:
        os.symlink(src.resolve(), dst)


def _folder_names(clusters: np.ndarray) -> list[str]:
    width = max(4, len(str(int(clusters.max(initial=0)) + 1)))
    return ["unsure" if c == UNSURE else f"person_{c + 1:0{width}d}" for c in clusters.tolist()]


def run_cluster(photos_dir: str | os.PathLike, out: str | os.PathLike, embedder: Any, *, model: str,
                threshold: float, threshold_source: str, method: str = "average", min_size: int = 2,
                copy: bool = False, truth: Optional[str] = None, workers: Optional[int] = None,
                batch_size: int = 64, num_workers: int = 0, progress: bool = True, multi: str = "largest",
                overwrite: bool = False, detect: bool = True, teacher_pass: Optional[TeacherPass] = None) -> dict:
    """Cluster the photos under ``photos_dir`` (or the shards there, also at a URL) and write FOLDERS (staged:
    complete or not at all). ``teacher_pass``: how a teacher embeds shards (photos.load_photos)."""
    out = Path(out)
    src = str(photos_dir) if is_remote(photos_dir) else Path(photos_dir)
    check_destination(Path(str(src)), out, overwrite, marker=MARKER, what="a cluster output")
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".cluster-", dir=out.resolve().parent) as work:
        photos = load_photos(src, embedder, Path(work), unlabeled=True, workers=workers, batch_size=batch_size,
                             num_workers=num_workers, progress=progress, multi=multi, detect=detect,
                             teacher_pass=teacher_pass)
        true = read_truth(truth, photos) if truth else None
        rows = np.flatnonzero(photos.embedded)
        t1 = time.perf_counter()
        clusters = np.full(len(photos), UNSURE, np.int64)
        clusters[rows] = cluster_embeddings(photos.embeddings[rows], threshold, method, min_size)
        seconds = time.perf_counter() - t1
        names = _folder_names(clusters)
        summary = {"photos": str(src), "model": model, "method": method, "threshold": threshold,
                   "threshold_source": threshold_source, "min_size": min_size,
                   "links": "copies" if copy else "symlinks",
                   "count": len(photos), "with_face": int(len(rows)), "clusters": int(clusters.max(initial=-1) + 1),
                   "unsure": int((clusters == UNSURE).sum()), "seconds": {"cluster": round(seconds, 2)}}
        if true is not None:
            summary["scores"] = cluster_scores(clusters, true)
        with staged_directory(out, last=MARKER) as tmp:
            table, summary["from_shards"] = _write_folders(tmp, photos, clusters, names, copy)
            write_text(tmp / "clusters.csv", table)
            write_json(tmp / MARKER, summary)
            try:  # the folders are kept even if the pictures fail
                _sheets(tmp, photos, clusters, names, summary)
            except Exception as err:  # noqa: BLE001
                log.error("contact sheets failed (%s: %s); the folders are complete", type(err).__name__, err)
        summary["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    log.info("wrote %s: %d photos -> %d people + %d unsure (%s at cosine %.4f) in %.1fs", out, len(photos),
             summary["clusters"], summary["unsure"], method, threshold, summary["seconds"]["total"])
    return summary


def _write_folders(tmp: Path, photos: Photos, clusters: np.ndarray, names: list[str],
                   copy: bool) -> tuple[str, int]:
    """The links (or copies), one folder per cluster; returns clusters.csv (path,folder,file) and how many photos
    were written from the shards' stored images (their originals are not here: shards at a URL, or moved)."""
    used: dict[str, set] = {}
    from_shards = 0
    rows = ["path,folder,file"]
    for i, (path, folder) in enumerate(zip(photos.files, names)):
        (tmp / folder).mkdir(exist_ok=True)
        taken = used.setdefault(folder, set())
        name, n = os.path.basename(path), 1
        while name in taken:  # two photos of one name from different folders
            stem, ext = os.path.splitext(os.path.basename(path))
            name, n = f"{stem}_{n}{ext}", n + 1
        taken.add(name)
        stored = None if photos.stored is None or (photos.root / path).exists() else photos.stored(i)
        if stored is not None:
            (tmp / folder / name).write_bytes(stored)
            from_shards += 1
        else:
            _link(photos.root / path, tmp / folder / name, copy)
        rows.append(",".join(_csv_field(v) for v in (path, folder, name)))
    return "\n".join(rows) + "\n", from_shards


def _csv_field(value: str) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow([value])
    return buffer.getvalue()


def _sheets(tmp: Path, photos: Photos, clusters: np.ndarray, names: list[str], summary: dict) -> None:
    people: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        people.setdefault(name, []).append(i)
    sheets = [Sheet(name, f"{len(members)} photos", [(i, caption(photos.files[i]), False)
                                                     for i in members[:SHEET_PHOTOS]])
              for name, members in sorted(people.items()) if name != "unsure"]
    unsure = people.get("unsure", [])
    lines = [f"{summary['count']} photos -> {summary['clusters']} proposed people and {summary['unsure']} unsure "
             f"({summary['method']} clustering at cosine {summary['threshold']:.4f}, {summary['threshold_source']})."]
    if "scores" in summary:
        sc = summary["scores"]
        lines.append(f"Against the true identities: BCubed F {sc['bcubed_f']:.4f} "
                     f"(precision {sc['bcubed_precision']:.4f},"
                     f" recall {sc['bcubed_recall']:.4f}); pairwise precision {sc['pairwise_precision']:.4f}, recall "
                     f"{sc['pairwise_recall']:.4f}.")
    sections = {"people": sheets,
                "unsure": [Sheet("unsure", "alone, or no face found", [(i, caption(photos.files[i]), True)
                                                                       for i in unsure[:SHEET_PHOTOS * 5]])]}
    write_sheets(tmp, "facesiam cluster", lines, sections, photos.thumbnail)
