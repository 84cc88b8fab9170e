"""facesiam make-pairs: write an LFW-format pairs file for an ImageFolder or a shard split.

    python tools/make_pairs.py DATA --out pairs.txt [--split val] [--folds 10 --pairs-per-fold 300 --seed 0]
"""

from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from . import command
from .common import log_to_stderr

log = logging.getLogger("facesiam.pairs")


@command("make_pairs")
def main(argv: Optional[Sequence[str]] = None) -> None:
    from ..eval.pairs import DEFAULT_FOLDS, make_pairs, write_pairs

    p = argparse.ArgumentParser(prog="make_pairs", description="Write an LFW-format pairs file for an ImageFolder or "
                                "a shard split (identities split among folds, as in LFW View 2).")
    p.add_argument("data", help="ImageFolder directory or shard directory (with dataset.json)")
    p.add_argument("--out", required=True, help="pairs file to write (e.g. pairs.txt)")
    p.add_argument("--split", default="val", help="shard split (ignored for an ImageFolder; default: val)")
    p.add_argument("--folds", type=int, default=DEFAULT_FOLDS)
    p.add_argument("--pairs-per-fold", type=int, default=300, help="same pairs per fold (as many different ones)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    log_to_stderr()
    from ..data import open_dataset

    ds = open_dataset(args.data, split=args.split)
    folds = make_pairs(ds.paths, ds.labels, ds.classes, folds=args.folds, pairs_per_fold=args.pairs_per_fold,
                       seed=args.seed)
    write_pairs(folds, args.out)
    log.info("wrote %s: %d folds x (%d same + %d different) pairs from %d images of %d identities (%s)",
             args.out, args.folds, args.pairs_per_fold, args.pairs_per_fold, len(ds), len(set(ds.labels.tolist())),
             args.data)
