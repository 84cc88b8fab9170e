"""facesiam make-synthetic-faces: an ImageFolder of procedurally drawn faces (see facesiam/synthetic.py)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..synthetic import DEFAULT_SEED, DEFAULT_SIZE, make_synthetic_faces
from . import command


@command("make_synthetic_faces")
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="make_synthetic_faces",
        description="Write an ImageFolder (OUT/id_00000/0000.png ...) of procedurally drawn faces: stable traits per "
                    "identity, varied pose/expression/lighting/background per image. Deterministic in --seed.")
    parser.add_argument("out", type=Path, help="output folder (must be absent or empty unless --overwrite)")
    parser.add_argument("--identities", type=int, required=True, help="number of identities (folders)")
    parser.add_argument("--images-per-identity", type=int, required=True, help="images per identity")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image side in pixels (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="dataset seed (default %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all usable CPUs)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = make_synthetic_faces(args.out, args.identities, args.images_per_identity, size=args.size,
                               seed=args.seed, workers=args.workers, overwrite=args.overwrite,
                               progress=not args.no_progress)
    seconds = time.perf_counter() - start
    n = args.identities * args.images_per_identity
    print(f"wrote {n} images ({args.identities} identities x {args.images_per_identity}, {args.size}px, seed {args.seed}) "
          f"to {out} in {seconds:.1f}s ({n / seconds:.0f} images/s)", file=sys.stdout)
    return out
