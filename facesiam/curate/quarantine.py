"""Quarantine: move the doctor's suspects out of a folder (never delete them) and put them back.

``apply_quarantine`` writes the manifest (every planned move, the file's SHA-256) *before* moving anything, so an
interrupted run can always be undone; ``undo_quarantine`` moves back every file that is in quarantine and not at
its old place, recreates folders the quarantine emptied, and checks the bytes against the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

from ..errors import InputError
from ..fileio import sha256_file, write_json

log = logging.getLogger("facesiam.curate")

MANIFEST_FORMAT = "facesiam-quarantine"


def _inside(path: Path, root: Path) -> bool:
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


def apply_quarantine(files: Sequence[str], root: str | os.PathLike, quarantine: str | os.PathLike,
                     reasons: Optional[dict[str, str]] = None) -> tuple[Path, int]:
    """Move ``files`` (relative to ``root``) to ``quarantine``/<same relative path>; (manifest path, files moved).

    Files already gone are skipped with a warning (listed in the manifest as not moved). A folder left empty is
    removed (recorded, so the undo recreates it).
    """
    root, quarantine = Path(root), Path(quarantine)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder: quarantine moves photos out of the folder the doctor "
                                 "checked (its findings name files relative to it)")
    if _inside(quarantine, root):
        raise InputError(f"quarantine folder {quarantine} is inside {root}: it would be read as an identity; "
                         "choose a folder outside it")
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise InputError(f"finding names {rel!r}, not a path inside {root}; use the findings the doctor wrote")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    moves = []
    for rel in files:
        src = root / rel
        dst = quarantine / rel
        if not src.is_file():
            log.warning("%s is not there any more; skipped", src)
            continue
        n = 1
        while dst.exists():  # an earlier quarantine of a same-named file: keep both
            dst, n = quarantine / f"{rel}.{n}", n + 1
        moves.append({"file": rel, "quarantined": dst.relative_to(quarantine).as_posix(), "sha256": sha256_file(src),
                      "reason": (reasons or {}).get(rel, "")})
    manifest = quarantine / f"manifest-{stamp}.json"
    record = {"format": MANIFEST_FORMAT, "version": 1, "root": str(root.resolve()),
              "quarantine": str(quarantine.resolve()), "created": stamp, "moves": moves, "removed_folders": []}
    write_json(manifest, record)  # first: whatever happens next can be undone
    for move in moves:
        target = quarantine / move["quarantined"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(root / move["file"]), str(target))
    emptied = sorted({(root / m["file"]).parent for m in moves}, key=lambda p: -len(p.parts))
    for folder in emptied:
        if folder != root and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            record["removed_folders"].append(folder.relative_to(root).as_posix())
    write_json(manifest, record)
    log.info("moved %d photos from %s to %s; undo with: facesiam doctor --undo %s", len(moves), root, quarantine,
             manifest)
    return manifest, len(moves)


def undo_quarantine(manifest: str | os.PathLike) -> int:
    """Put back every photo of ``manifest``; returns how many were moved back. A file whose old place is taken
    again, or whose bytes changed in quarantine, is left where it is with a warning."""
    path = Path(manifest)
    if not path.is_file():
        raise FileNotFoundError(f"quarantine manifest {path} not found; it is the manifest-*.json in the "
                                "quarantine folder")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a quarantine manifest ({err})") from None
    if record.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{path}: not a quarantine manifest (format {record.get('format')!r})")
    root, quarantine = Path(record["root"]), path.parent
    for folder in record.get("removed_folders", []):
        (root / folder).mkdir(parents=True, exist_ok=True)
    back = 0
    for move in record["moves"]:
        src, dst = quarantine / move["quarantined"], root / move["file"]
        if not src.is_file():
            if not dst.is_file():
                log.warning("%s is neither in quarantine nor back in place", move["file"])
            continue
        if dst.exists():
            log.warning("%s exists again; %s left in quarantine", dst, src)
            continue
        if sha256_file(src) != move["sha256"]:
            log.warning("%s changed in quarantine (its SHA-256 differs from the manifest's); left there", src)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))
        back += 1
    held = {(quarantine / m["quarantined"]).parent for m in record["moves"]}
    for folder in sorted(held, key=lambda p: -len(p.parts)):  # deepest first: empty folders left in quarantine
        while folder != quarantine and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    log.info("moved %d photos back to %s", back, root)
    return back
