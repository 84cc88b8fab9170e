"""The alignment record: ``alignment.json`` beside an aligned ImageFolder, and how to find any data's alignment.

align_folder writes it (how faces were aligned: ``alignment_info``; counts; one line per source image with its
status, reason, box, score and landmarks); make_shards copies it into dataset.json under "alignment"; training
exports its "info" with the model, so inference aligns the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Collection, Optional, Sequence

from ..data.format import METADATA_FILE, read_metadata
from ..data.recordio import RecordFile, is_record_folder
from ..data.remote import is_remote
from ..errors import InputError
from .aligner import SKIP_KINDS, STATUSES

ALIGNMENT_FILE = "alignment.json"
ALIGNMENT_FORMAT = "facesiam-aligned"
ALIGNMENT_FORMAT_VERSION = 1


def count_results(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many images ended in each status and skip kind, and how many had several faces."""
    counts = {"images": len(records), **{status: 0 for status in STATUSES}, "multi_face": 0,
              **{f"skipped_{kind}": 0 for kind in SKIP_KINDS}}
    for r in records:
        counts[r["status"]] += 1
        counts["multi_face"] += r["faces"] > 1
        if r["skip"]:
            counts[f"skipped_{r['skip']}"] += 1
    return counts


def record_text(meta: dict[str, Any]) -> str:
    """alignment.json: the header indented, then one line per image (readable, grep-able, and compact for
    millions of images, where one field per line would be ~20x the size)."""
    head = json.dumps({k: v for k, v in meta.items() if k != "images"}, indent=1, ensure_ascii=False)
    lines = ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in meta["images"])
    return f'{head[:-2]},\n "images": [\n{lines}\n ]\n}}\n'


def read_alignment(folder: str | os.PathLike) -> Optional[dict[str, Any]]:
    """``folder/alignment.json`` of a folder align_folder made, or None when there is none."""
    path = Path(folder) / ALIGNMENT_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err}); align the photos again with tools/align_faces.py") from None
    if meta.get("format") != ALIGNMENT_FORMAT or meta.get("version", 0) > ALIGNMENT_FORMAT_VERSION:
        raise InputError(f"{path}: not an alignment record this facesiam reads (format {meta.get('format')!r} "
                         f"version {meta.get('version')!r}); align the photos again with tools/align_faces.py")
    return meta


def crops_of(record: dict[str, Any], sources: Collection[str]) -> set[str]:
    """The aligned crops (paths in the aligned folder) of the source photos ``sources`` (paths in the photo folder),
    through an alignment record: what to leave out of shards for the doctor's suspects."""
    return {r["output"] for r in record["images"] if r["output"] and r["path"] in sources}


def recorded_alignment(data: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The alignment ``data`` (a shard folder, local or at a URL, or an ImageFolder) already went through, or None:
    raw images."""
    if is_remote(data):
        return (read_metadata(data).get("alignment") or {}).get("info")
    data = Path(data)
    if (data / METADATA_FILE).is_file():
        return (read_metadata(data).get("alignment") or {}).get("info")
    if is_record_folder(data):  # insightface RecordIO: ArcFace crops at property's size (as make_shards records)
        from .aligner import prealigned_info

        size = RecordFile(data).image_size
        return prealigned_info("arcface112", size and size[0]) if size is None or size[0] == size[1] else None
    meta = read_alignment(data)
    return meta["alignment"] if meta else None

