"""``align_faces SRC DST``: detect faces in an ImageFolder of raw photos and write 112x112 aligned crops.

The work is facesiam.faces.folder.align_folder; this module parses the arguments, shows progress and prints the
summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from . import command
from .common import ProgressBar, add_alignment_options, alignment_options
from ..faces.aligner import SKIP_KINDS
from ..faces.detectors import MTCNN_INSTALL_HINT
from ..faces.folder import align_folder
from ..faces.record import ALIGNMENT_FILE

SKIPPED_SHOWN = 20  # skipped files printed on stderr (all of them are in alignment.json)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align_faces",
        description="Detect faces (MTCNN) in an ImageFolder of raw photos (SRC/<identity>/<image>) and write an "
                    "ImageFolder of aligned crops (5-point similarity transform onto the ArcFace template) to DST, "
                    "with DST/alignment.json recording what happened to every image. Needs "
                    f"`{MTCNN_INSTALL_HINT}`.")
    parser.add_argument("src", type=Path, help="ImageFolder of raw photos: one sub-folder per identity")
    parser.add_argument("dst", type=Path, help="output ImageFolder of PNG crops (must be new or empty unless "
                                               "--overwrite)")
    add_alignment_options(parser)
    parser.add_argument("--workers", type=int, default=None,
                        help="CPU: detector processes, one thread each (default: all usable CPUs); "
                             "GPU: image-decoding threads")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing aligned folder at DST")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def summary(meta: dict[str, Any], dst: Path) -> str:
    """The one-line summary of a run from alignment.json's contents."""
    c = meta["counts"]
    skipped = ", ".join(f"{c['skipped_' + kind]} {kind.replace('_', ' ')}" for kind in SKIP_KINDS
                        if c["skipped_" + kind])
    rate = c["images"] / max(meta["seconds"], 1e-9)
    return (f"align_faces: {c['images']:,} images: {c['aligned']:,} faces aligned, {c['skipped']:,} skipped"
            f"{f' ({skipped})' if skipped else ''}, {c['multi_face']:,} with several faces, {c['center']:,} "
            f"centre-cropped; {meta['seconds']:.1f} s ({rate:,.1f} images/s) -> {dst}")


def report_skipped(meta: dict[str, Any], prog: str, record: Path) -> None:
    """Problems always go to stderr (nothing bad is silent): skipped images and identities left without a face."""
    skipped = [r for r in meta["images"] if r["status"] == "skipped"]
    if skipped:
        print(f"{prog}: skipped {len(skipped)} image(s) (all listed in {record}):", file=sys.stderr)
        for r in skipped[:SKIPPED_SHOWN]:
            print(f"  {r['path']}: {r['reason']}", file=sys.stderr)
        if len(skipped) > SKIPPED_SHOWN:
            print(f"  ... and {len(skipped) - SKIPPED_SHOWN} more", file=sys.stderr)
    names = meta.get("identities_without_images") or []  # (make_shards reports these itself)
    if names:
        print(f"{prog}: {len(names)} identity folder(s) kept no face: "
              f"{', '.join(names[:SKIPPED_SHOWN])}{' ...' if len(names) > SKIPPED_SHOWN else ''}", file=sys.stderr)


@command("align_faces")
def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    bar = ProgressBar("align_faces", disable=args.no_progress)
    try:
        meta = align_folder(args.src, args.dst, workers=args.workers, overwrite=args.overwrite,
                                  progress=bar, **alignment_options(args))
    finally:
        bar.close()
    report_skipped(meta, "align_faces", args.dst / ALIGNMENT_FILE)
    print(summary(meta, args.dst), file=sys.stderr)
    return meta
