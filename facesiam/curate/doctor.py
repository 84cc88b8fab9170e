"""The data doctor: a user's folders -> REPORT/findings.jsonl, REPORT/report.html (.md), REPORT/doctor.json.

    photos (curate/photos: detect, align as trained, embed) -> thresholds (the model's evaluation report, or
    estimated from the data) -> checks (curate/checks) -> findings.jsonl first, then the contact sheets

The same-person threshold comes from the model's evaluation report at an operating point (FAR 1e-3 by default, as
compare and serve decide), or is given. Without either it is estimated from the data itself: pairs of photos in
different folders are nearly all impostor pairs even in a noisy set, so the score a fraction FAR of them exceed is
the threshold at that FAR (the log says so). Identity merges use a stricter point (``merge_far``) because a data
set has far more pairs of identities than pairs of photos of one person.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..data.folder import check_destination
from ..fileio import staged_directory, write_json
from .checks import CheckSettings, run_checks
from .findings import KINDS, Finding, write_findings
from .photos import Photos, TeacherPass, load_photos
from .sheets import Sheet, caption, count_table, write_sheets

log = logging.getLogger("facesiam.curate")

DEFAULT_STRANGER_FAR = 1e-2
DEFAULT_MERGE_FAR = 1e-5
IMPOSTOR_SAMPLE = 2_000_000  # impostor pairs drawn to estimate a threshold from the data


def far_threshold(photos: Photos, far: float, seed: int = 0) -> Optional[float]:
    """The cosine that a fraction ``far`` of pairs of photos from different identities exceed (None: too few)."""
    rows = np.flatnonzero(photos.embedded)
    ident = np.asarray([photos.identities[i] for i in rows])
    if len(rows) < 2 or len(set(ident)) < 2:
        return None
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(rows), (2, IMPOSTOR_SAMPLE))
    keep = ident[a] != ident[b]
    if keep.sum() * far < 10:  # fewer than 10 pairs above it: no estimate
        return None
    e = photos.embeddings[rows]
    scores = np.einsum("ij,ij->i", e[a[keep]], e[b[keep]])
    return float(np.quantile(scores, 1.0 - far))


def thresholds(photos: Photos, *, report: Optional[str] = None, operating_point: str = "far=1e-3",
               same_person: Optional[float] = None, far: float = 1e-3, stranger_far: float = DEFAULT_STRANGER_FAR,
               merge: Optional[float] = None, merge_far: float = DEFAULT_MERGE_FAR) -> tuple[dict, dict]:
    """({same_person, stranger, merge}, where each came from): given, else the model's evaluation report at its
    FAR, else estimated from the data at that FAR."""
    from ..errors import InputError
    from ..eval.compare import threshold_from_report

    wanted = {"same_person": (same_person, operating_point if report else f"far={far:g}"),
              "stranger": (None, f"far={stranger_far:g}"), "merge": (merge, f"far={merge_far:g}")}
    values, notes = {}, {}
    for key, (given, point) in wanted.items():
        if given is not None:
            values[key], notes[key] = float(given), "given"
            continue
        if report is not None:
            try:
                values[key], notes[key] = threshold_from_report(report, point)
                continue
            except InputError as err:  # e.g. no threshold at so strict a FAR: too few pairs evaluated
                log.info("%s; estimating the %s threshold from the data", err, key)
        at = float(point.split("=", 1)[1]) if point.startswith("far=") else far
        values[key] = far_threshold(photos, at)
        notes[key] = f"estimated from the data: FAR {at:g} of pairs of photos in different folders"
        if values[key] is None and key != "same_person":  # too few photos for so small a FAR: the basic threshold
            values[key], notes[key] = values["same_person"], "the same-person threshold (too few photos to estimate)"
        if values[key] is None:
            raise InputError(f"too few photos to estimate the {key} threshold from the data; give --report REPORT "
                             "(facesiam evaluate of this model) or --threshold T")
        log.info("%s threshold %.4f, %s", key, values[key], notes[key])
    values["stranger"] = min(values["stranger"], values["same_person"])
    values["merge"] = max(values["merge"], values["same_person"])
    return values, notes


def sheets_for(findings: list[Finding], photos: Photos) -> dict[str, list[Sheet]]:
    """One contact sheet per finding, grouped by kind."""
    position = {f: i for i, f in enumerate(photos.files)}
    sections: dict[str, list[Sheet]] = {}
    for f in findings:
        shown = [(position[p], caption(p), True) for p in f.suspects if p in position]
        shown += [(position[p], caption(p), False) for p in f.files if p not in f.suspects and p in position]
        shown += [(position[p], caption(p), False) for p in f.compared_with if p in position and p not in f.files]
        title = f"{', '.join(f.identities)} (score {f.score:.3f}, {f.action})"
        sections.setdefault(f.kind, []).append(Sheet(title, f.reason, shown))
    return sections


def run_doctor(data: str | os.PathLike, out: str | os.PathLike, embedder: Any, *, model: str,
               report: Optional[str] = None, operating_point: str = "far=1e-3", same_person: Optional[float] = None,
               far: float = 1e-3, stranger_far: float = DEFAULT_STRANGER_FAR, merge: Optional[float] = None,
               merge_far: float = DEFAULT_MERGE_FAR, settings: Optional[dict] = None,
               workers: Optional[int] = None, batch_size: int = 64, num_workers: int = 0, progress: bool = True,
               multi: str = "largest", overwrite: bool = False, detect: bool = True,
               teacher_pass: Optional[TeacherPass] = None) -> dict:
    """Examine DATA (a folder, or shards at a URL) with ``embedder``; write REPORT (staged: it appears complete).
    ``teacher_pass``: how a teacher embeds shards (load_photos). Returns doctor.json's contents."""
    out = Path(out)
    # never inside DATA (the report's thumbnails would become an identity), never over anything but a report
    check_destination(Path(str(data)), out, overwrite, marker="doctor.json", what="a doctor report")
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".doctor-", dir=out.resolve().parent) as work:
        photos = load_photos(data, embedder, Path(work), workers=workers, batch_size=batch_size,
                             num_workers=num_workers, progress=progress, multi=multi, detect=detect,
                             teacher_pass=teacher_pass)
        t1 = time.perf_counter()
        values, notes = thresholds(photos, report=report, operating_point=operating_point, same_person=same_person,
                                   far=far, stranger_far=stranger_far, merge=merge, merge_far=merge_far)
        known = {f.name for f in fields(CheckSettings)}
        s = CheckSettings(**values, **{k: v for k, v in (settings or {}).items() if k in known and v is not None})
        findings = run_checks(photos, s, progress=progress)
        check_seconds = time.perf_counter() - t1
        counts = Counter({kind: 0 for kind in KINDS})
        counts.update(f.kind for f in findings)
        summary = {"data": str(data), "root": str(photos.root), "model": model, "photos": len(photos),
                   "embedded": int(photos.embedded.sum()), "identities": len(set(photos.identities) - {""}),
                   "settings": asdict(s), "thresholds": notes, "counts": dict(counts),
                   "suspects": len({p for f in findings for p in f.suspects}),
                   "seconds": {"total": round(time.perf_counter() - t0, 2),
                               "embed": photos.meta.get("embed_seconds"), "checks": round(check_seconds, 2)}}
        with staged_directory(out) as tmp:
            write_findings(tmp / "findings.jsonl", findings)
            write_json(tmp / "doctor.json", summary)
            try:  # the findings are kept even if the pictures fail
                lines = [f"{summary['photos']} photos of {summary['identities']} identities in {photos.root}, "
                         f"model {model}; thresholds: " + "; ".join(f"{k} {values[k]:.4f} ({notes[k]})"
                                                                     for k in values) + ".",
                         f"{len(findings)} findings, {summary['suspects']} photos suggested for quarantine "
                         "(red frames). Delete the lines of findings.jsonl you disagree with, then apply it."]
                write_sheets(tmp, "facesiam doctor", lines, sheets_for(findings, photos), photos.thumbnail,
                             dict(counts))
            except Exception as err:  # noqa: BLE001 -- a picture must not cost the findings
                log.error("contact sheets failed (%s: %s); findings.jsonl is complete", type(err).__name__, err)
    log.info("%s", "\n".join(count_table(counts)))
    log.info("wrote %s: %d findings about %d photos in %.1fs (embedding %.1fs, checks %.1fs)", out, len(findings),
             len(photos), time.perf_counter() - t0, photos.meta.get("embed_seconds", 0), check_seconds)
    return summary
