"""facesiam make-shards: pack an ImageFolder into WebDataset shards (see facesiam/data/writer.py and format.py).

    python tools/make_shards.py SRC DST [--val-identities N|F] [--resize PIXELS] [--center-crop FRACTION]
    python tools/make_shards.py PHOTOS DST --align [--multi central] ...   # detect + align raw photos first
    python tools/make_shards.py SRC s3://bucket/shards ...   # or gs://: written locally, uploaded dataset.json last
    python tools/make_shards.py MS1MV3/ DST   # insightface RecordIO (train.rec + train.idx): images copied as stored
    python tools/make_shards.py CROPS/ DST --aligned arcface112   # crops already aligned onto the ArcFace template
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Union

import sys

from ..data import writer
from ..data.recordio import RecordFile, is_record_folder
from ..data.remote import is_remote
from ..errors import InputError
from . import command
from .common import ProgressBar, add_alignment_options, alignment_options


def _count_or_fraction(text: str) -> Union[int, float, list[str]]:
    if Path(text).is_file():  # a file of identity names, one per line
        return [line.strip() for line in Path(text).read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not 0 < value < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: give a count (integer) or a fraction in (0, 1)")
        return value


def _destination(text: str) -> Union[Path, str]:
    """A local folder (Path) or a URL (kept as text: Path would fold its '//')."""
    return text if is_remote(text) else Path(text)


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


def _excluded(findings: Optional[str], src: Path) -> Optional[set[str]]:
    """The doctor's suspects as paths of SRC. The doctor names source photos; for an aligned folder (align_faces)
    they are mapped to its crops through alignment.json."""
    if not findings:
        return None
    from ..curate.findings import read_findings, suspects
    from ..faces.record import crops_of, read_alignment

    files = set(suspects(read_findings(findings)))
    record = read_alignment(src)
    if record is not None:
        files = crops_of(record, files)
    print(f"make_shards: leaving out {len(files):,} photos named by {findings}", file=sys.stderr)
    return files


def _given_alignment(src: Path, aligned: Optional[str]) -> Optional[dict]:
    """The alignment record for dataset.json of data aligned before make_shards: an align_faces folder's
    alignment.json, crops aligned elsewhere (--aligned NAME), RecordIO data (arcface112 at property's size, as
    faces/record.recorded_alignment says, unless --aligned none)."""
    from ..faces.aligner import prealigned_info
    from ..faces.record import count_results, read_alignment, recorded_alignment

    if aligned == "none":
        return None
    if not is_record_folder(src):
        record = read_alignment(src) if src.is_dir() else None
        if record is not None and aligned is None:
            return record
        info, images = (prealigned_info(aligned) if aligned else None), None
    else:
        info, images = recorded_alignment(src), len(RecordFile(src).image_keys)
        if aligned and (info is None or info["size"] != prealigned_info(aligned)["size"]):
            raise InputError(f"{src}/property does not describe {prealigned_info(aligned)['size']} px square crops: "
                             f"they are not on the template --aligned {aligned} names")
    if info is None:
        return None
    counts = count_results([])
    if images is not None:
        counts.update(images=images, aligned=images)
    return {"alignment": info, "source": str(src.resolve()), "counts": counts, "images": []}


@command("make_shards")
def main(argv: Optional[list[str]] = None) -> dict:
    from ..faces.aligner import PREALIGNED

    parser = argparse.ArgumentParser(
        prog="make_shards",
        description="Pack an ImageFolder (SRC/<identity>/<image>) into WebDataset tar shards plus an offset index "
                    "and DST/dataset.json. Broken images are skipped and listed, never fatal. An insightface RecordIO "
                    "folder (train.rec, train.idx, property) is packed as stored, without decoding.")
    parser.add_argument("src", type=Path, help="ImageFolder: one sub-folder per identity; or an insightface RecordIO "
                                               "folder (train.rec, train.idx, property: MS1MV3, Glint360K, ...)")
    parser.add_argument("dst", type=_destination,
                        help="output folder (must be new or empty unless --overwrite), or a URL: s3://bucket/prefix, "
                             "gs://... (written in $TMPDIR, then uploaded with dataset.json last; options from "
                             "FSSPEC_S3_ENDPOINT_URL etc.)")
    parser.add_argument("--val-identities", type=_count_or_fraction, default=None,
                        help="hold out whole identities as a 'val' split: a count (e.g. 100), a fraction "
                             "(e.g. 0.1) or a file naming them one per line; default: none")
    parser.add_argument("--max-samples-per-shard", type=int, default=writer.MAX_SAMPLES_PER_SHARD,
                        help="start a new shard after this many samples (default %(default)s)")
    parser.add_argument("--max-bytes-per-shard", type=_size, default=writer.MAX_BYTES_PER_SHARD,
                        help="start a new shard before exceeding this size, e.g. 256M or 1G (default 256M)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all usable CPUs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the val identity choice (default %(default)s)")
    parser.add_argument("--resize", type=int, default=None, metavar="PIXELS",
                        help="shrink so the shorter side is at most PIXELS (smaller shards; off by default)")
    parser.add_argument("--center-crop", type=float, default=None, metavar="FRACTION",
                        help="keep the central square of FRACTION of the shorter side before --resize "
                             "(LFW: 0.6); off by default")
    parser.add_argument("--unlabeled", action="store_true",
                        help="SRC holds photos without identities (any folder layout): each photo is its own "
                             "identity; for distillation (launch/train.py --teacher), which needs no labels")
    parser.add_argument("--exclude", metavar="FINDINGS",
                        help="leave out the photos facesiam doctor suggests to quarantine (its findings.jsonl, or "
                             "the report folder); edit the file first to keep the ones you disagree with")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing shard folder at DST")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    face = parser.add_argument_group("face alignment (--align)")
    face.add_argument("--align", action="store_true",
                      help="SRC holds raw photos: detect each face (MTCNN), align it onto the ArcFace template and "
                           "pack the crops; dataset.json records the alignment and every image's result (as "
                           "tools/align_faces.py SRC FACES && tools/make_shards.py FACES DST would)")
    add_alignment_options(face, size_flag="--align-size")
    face.add_argument("--aligned", choices=[*PREALIGNED, "none"], default=None,
                      help="SRC holds crops already aligned onto this template (arcface112: insightface's 112 px "
                           "ArcFace crops): dataset.json records the alignment as --align would, so a model trained on "
                           "them detects and aligns raw photos at inference. Default for RecordIO data: arcface112 "
                           "(at property's size); none: record no alignment")
    args = parser.parse_args(argv)
    options = dict(val_identities=args.val_identities, max_samples_per_shard=args.max_samples_per_shard,
                   max_bytes_per_shard=args.max_bytes_per_shard, workers=args.workers, seed=args.seed,
                   resize=args.resize, center_crop=args.center_crop, overwrite=args.overwrite, unlabeled=args.unlabeled,
                   progress=not args.no_progress, exclude=_excluded(args.exclude, args.src))
    if args.align and args.aligned:
        raise InputError("--align aligns raw photos, --aligned says they already are: give one of them")
    if not args.align:
        return writer.write_shards(args.src, args.dst, alignment=_given_alignment(args.src, args.aligned), **options)
    from ..faces.folder import align_shards
    from .align_faces import report_skipped

    bar = ProgressBar("align", disable=args.no_progress)
    try:
        if is_remote(args.dst):  # aligned and packed locally, then uploaded
            with writer.remote_destination(args.dst, args.overwrite, not args.no_progress) as local:
                meta = align_shards(args.src, local, align_progress=bar, **options, **alignment_options(args))
        else:
            meta = align_shards(args.src, args.dst, align_progress=bar, **options, **alignment_options(args))
    finally:
        bar.close()
    report_skipped(meta["alignment"], "make_shards", f"{args.dst}/{writer.METADATA_FILE}")
    c = meta["alignment"]["counts"]
    print(f"make_shards: aligned {c['aligned']:,} of {c['images']:,} photos ({c['skipped']:,} skipped, "
          f"{c['multi_face']:,} with several faces, {c['center']:,} centre-cropped); alignment and every image's "
          f"result in {args.dst}/{writer.METADATA_FILE}", file=sys.stderr)
    return meta
