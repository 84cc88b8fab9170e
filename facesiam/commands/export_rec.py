"""facesiam export-rec: write facesiam shards as insightface RecordIO (train.rec, train.idx, property), for other
trainers (arcface_torch and anything reading MS1MV3-style data); see facesiam/data/recordio.py.

    python tools/export_rec.py SHARDS/ OUT/ [--splits train,val] [--overwrite]

Image bytes are copied as stored (no re-encoding); images are grouped by identity with insightface's header 0 and
identity records (the identity table); identity names go to OUT/identities.json (facesiam's own addition, which
make_shards reads back; other readers ignore it).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..data.format import read_metadata
from ..data.readers import ShardDataset
from ..data.recordio import write_rec
from ..errors import InputError
from . import command


def export_rec(shards: str | Path, out: str | Path, *, splits: tuple[str, ...] = ("train",), overwrite: bool = False,
               progress: bool = True) -> dict:
    """Write the ``splits`` of a shard folder as a RecordIO folder ``out``; returns write_rec's counts."""
    meta = read_metadata(shards)
    unknown = [s for s in splits if s not in meta["splits"]]
    if unknown:
        raise InputError(f"{shards} has no split {unknown[0]!r} (it has {', '.join(sorted(meta['splits']))})")
    datasets = [ShardDataset(shards, split) for split in splits]
    which = np.concatenate([np.full(len(ds), k, np.int64) for k, ds in enumerate(datasets)])
    index = np.concatenate([np.arange(len(ds), dtype=np.int64) for ds in datasets])
    labels = np.concatenate([ds.labels for ds in datasets])
    order = np.argsort(labels, kind="stable")  # header 0 needs each identity's images together

    def samples() -> Iterator[tuple[bytes, int]]:
        for k in order.tolist():
            yield datasets[which[k]].read_bytes(int(index[k])), int(labels[k])

    size = ((meta.get("alignment") or {}).get("info") or {}).get("size")
    if size is not None:
        image_size = (int(size), int(size))
    elif len(order):
        from PIL import Image

        with Image.open(io.BytesIO(datasets[which[order[0]]].read_bytes(int(index[order[0]])))) as first:
            image_size = (first.height, first.width)  # property's height,width: the first image's
    else:
        raise InputError(f"{shards}: the splits {', '.join(splits)} hold no images")
    return write_rec(out, samples(), header0=True, num_classes=len(meta["classes"]), image_size=image_size,
                     identities=meta["classes"], overwrite=overwrite, progress=progress, total=len(order))


@command("export_rec")
def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="export_rec",
        description="Write facesiam shards as insightface RecordIO (train.rec, train.idx, property) for other "
                    "trainers: image bytes as stored, header 0 and the identity table, names in identities.json.")
    parser.add_argument("shards", help="a shard folder (tools/make_shards.py)")
    parser.add_argument("out", type=Path, help="output folder for train.rec, train.idx, property, identities.json")
    parser.add_argument("--splits", default="train",
                        help="comma-separated splits to write (default %(default)s; train,val: all the images)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing train.rec in OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    counts = export_rec(args.shards, args.out, splits=splits, overwrite=args.overwrite,
                        progress=not args.no_progress)
    print(f"export_rec: {counts['images']:,} images of {counts['identities']:,} identities ({', '.join(splits)}) "
          f"-> {args.out}/train.rec ({counts['bytes'] / 1e6:,.1f} MB)", file=sys.stderr)
    return counts
