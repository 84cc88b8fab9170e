"""facesiam make-bin: a verification set in insightface's .bin format from your own held-out people.

    python tools/make_bin.py FOLDER pairs.txt OUT.bin [--split val] [--resize]

FOLDER: an ImageFolder of aligned 112x112 crops (tools/align_faces.py --size 112) or a shard directory (--split);
pairs.txt: an LFW-format pairs file (LFW's own, or tools/make_pairs.py FOLDER --out pairs.txt). The .bin then
serves evaluate --bin and training's --val-bin like lfw.bin does (facesiam/eval/verification_bin.py).
"""

from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from . import command
from .common import log_to_stderr

log = logging.getLogger("facesiam.eval")


@command("make_bin")
def main(argv: Optional[Sequence[str]] = None) -> dict:
    from ..eval.verification_bin import BIN_SIZE, make_bin

    p = argparse.ArgumentParser(prog="make_bin", description="Write an insightface .bin verification set (pickle of "
                                "image bytes and same/different flags, pairs consecutive) from a folder of aligned "
                                f"{BIN_SIZE}x{BIN_SIZE} face crops and an LFW-format pairs file.")
    p.add_argument("data", help="ImageFolder of aligned crops, or a shard directory (dataset.json)")
    p.add_argument("pairs", help="LFW-format pairs file ('FOLDS N' or 'N' header), e.g. from tools/make_pairs.py")
    p.add_argument("out", help="the .bin to write (e.g. mine.bin; its name is the set's name in reports)")
    p.add_argument("--split", default="val", help="shard split (ignored for an ImageFolder; default: val)")
    p.add_argument("--resize", action="store_true",
                   help=f"resize images that are not {BIN_SIZE}x{BIN_SIZE} (default: refuse them; align instead)")
    args = p.parse_args(argv)
    log_to_stderr()
    summary = make_bin(args.data, args.pairs, args.out, split=args.split, resize=args.resize)
    log.info("wrote %s: %d pairs (%d same) of %d images, %.1f MB%s%s", args.out, summary["n_pairs"],
             summary["n_same"], summary["n_images"], summary["bytes"] / 1e6,
             f"; {summary['resized']} resized" if summary["resized"] else "",
             f"; {summary['reencoded']} re-encoded as PNG" if summary["reencoded"] else "")
    return summary
