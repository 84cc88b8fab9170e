"""``align_faces SRC DST``: detect faces in an ImageFolder of raw photos and write 112x112 aligned crops.

The work is facesiam.data.align.align_folder; this module parses the arguments, shows progress and prints the
summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm import tqdm

from . import command
from ..data import align

SKIPPED_SHOWN = 20  # skipped files printed on stderr (all of them are in alignment.json)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align_faces",
        description="Detect faces (MTCNN) in an ImageFolder of raw photos (SRC/<identity>/<image>) and write an "
                    "ImageFolder of aligned crops (5-point similarity transform onto the ArcFace template) to DST, "
                    "with DST/alignment.json recording what happened to every image. Needs "
                    f"`{align.INSTALL_HINT}`.")
    parser.add_argument("src", type=Path, help="ImageFolder of raw photos: one sub-folder per identity")
    parser.add_argument("dst", type=Path, help="output ImageFolder of PNG crops (must be new or empty unless "
                                               "--overwrite)")
    parser.add_argument("--size", type=int, default=align.TEMPLATE_SIZE,
                        help="crop side in pixels; the template is scaled by size/112 (default %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help="CPU: detector processes, one thread each (default: all usable CPUs); "
                             "GPU: image-decoding threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    parser.add_argument("--on-no-face", choices=align.NO_FACE_CHOICES, default="skip",
                        help="an image without a face is skipped, or its centre is cropped (default %(default)s)")
    parser.add_argument("--multi", choices=align.MULTI_CHOICES, default="largest",
                        help="with several faces keep the largest, or the one nearest the image centre "
                             "(LFW-style crops: central) (default %(default)s)")
    parser.add_argument("--min-face-size", type=int, default=20,
                        help="smallest face searched for and kept, in source pixels (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"images per detector call (default {align.CPU_BATCH} on CPU, {align.GPU_BATCH} on GPU)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing aligned folder at DST")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def summary(meta: dict[str, Any], dst: Path) -> str:
    """The one-line summary of a run from alignment.json's contents."""
    c = meta["counts"]
    skipped = ", ".join(f"{c['skipped_' + kind]} {kind.replace('_', ' ')}" for kind in align.SKIP_KINDS
                        if c["skipped_" + kind])
    rate = c["images"] / max(meta["seconds"], 1e-9)
    return (f"align_faces: {c['images']:,} images: {c['aligned']:,} faces aligned, {c['skipped']:,} skipped"
            f"{f' ({skipped})' if skipped else ''}, {c['multi_face']:,} with several faces, {c['center']:,} "
            f"centre-cropped; {meta['seconds']:.1f} s ({rate:,.1f} images/s) -> {dst}")


@command("align_faces")
def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    bar: Optional[tqdm] = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:  # made on the first batch: an error before any work prints only its one line
            bar = tqdm(total=total, unit="img", desc="align_faces", disable=args.no_progress, smoothing=0.1)
        bar.update(done)

    try:
        meta = align.align_folder(args.src, args.dst, size=args.size, workers=args.workers, device=args.device,
                                  on_no_face=args.on_no_face, multi=args.multi, min_face_size=args.min_face_size,
                                  batch_size=args.batch_size, overwrite=args.overwrite, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    skipped = [r for r in meta["images"] if r["status"] == "skipped"]
    if skipped:  # problems always go to stderr: nothing bad is silent
        print(f"align_faces: skipped {len(skipped)} image(s) (all listed in {args.dst / align.ALIGNMENT_FILE}):",
              file=sys.stderr)
        for r in skipped[:SKIPPED_SHOWN]:
            print(f"  {r['path']}: {r['reason']}", file=sys.stderr)
        if len(skipped) > SKIPPED_SHOWN:
            print(f"  ... and {len(skipped) - SKIPPED_SHOWN} more", file=sys.stderr)
    if meta["identities_without_images"]:
        names = meta["identities_without_images"]
        print(f"align_faces: {len(names)} identity folder(s) kept no face and are absent from {args.dst}: "
              f"{', '.join(names[:SKIPPED_SHOWN])}{' ...' if len(names) > SKIPPED_SHOWN else ''}", file=sys.stderr)
    print(summary(meta, args.dst), file=sys.stderr)
    return meta
