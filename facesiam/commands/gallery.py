"""facesiam gallery: build, extend and search a persistent FAISS gallery (see facesiam/eval/gallery.py).

    python tools/gallery.py build --embeddings gallery.npz --out GALLERY [--kind flat|ivf|hnsw]
    python tools/gallery.py build --checkpoint RUN/best --data DIR --out GALLERY
    python tools/gallery.py add --index GALLERY --embeddings more.npz          (or --checkpoint + --data)
    python tools/gallery.py search --index GALLERY --checkpoint RUN/best --image IMG [IMG ...] -k 5
    python tools/gallery.py search --index GALLERY --embeddings probes.npz -k 5 --out results.json
    python tools/gallery.py info --index GALLERY
    python tools/gallery.py import --index GALLERY --db SERVED      (a folder-format gallery into the service's database)
    python tools/gallery.py export --db SERVED --out GALLERY [--kind hnsw]   (and back, e.g. for evaluation)

SERVED is what facesiam serve uses: a --gallery folder (its gallery.sqlite), a .sqlite file or a postgresql:// URL.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from ..fileio import write_text
from . import command
from .common import add_model_arguments, log_to_stderr

log = logging.getLogger("facesiam.gallery")


def _inputs(args) -> dict:
    """Embeddings from --embeddings NPZ, or from --checkpoint + --data."""
    from ..eval.embed import embed_path, embed_path_onnx, load_embeddings

    if args.embeddings:
        return load_embeddings(args.embeddings)
    if not ((args.checkpoint or args.onnx) and args.data):
        raise InputError(f"gallery {args.command}: pass --embeddings NPZ, or --checkpoint RUN/best (or --onnx "
                         "model.onnx) with --data DIR")
    if args.onnx:
        return embed_path_onnx(args.onnx, args.data, split=args.split, flip=args.flip, batch_size=args.batch_size,
                               align=args.align)
    return embed_path(args.checkpoint, args.data, split=args.split, flip=args.flip, batch_size=args.batch_size,
                      num_workers=args.num_workers, device=args.device, align=args.align)


def _entry_identities(data: dict) -> list[str]:
    return [data["classes"][i] for i in data["labels"]]


def _parser() -> argparse.ArgumentParser:
    from ..eval.gallery import DEFAULT_TARGET_RECALL, KINDS

    p = argparse.ArgumentParser(prog="gallery", description="Build, extend and search a persistent FAISS gallery.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, model_required=False):
        add_model_arguments(sp, required=model_required, onnx=True)
        sp.add_argument("--embeddings", help="embeddings .npz from tools/embed.py")
        sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    b = sub.add_parser("build", help="new gallery from an .npz or a folder")
    common(b)
    b.add_argument("--out", required=True, help="gallery directory to write")
    b.add_argument("--kind", choices=KINDS, default="flat", help="flat = exact (default); ivf, hnsw = approximate")
    b.add_argument("--nlist", type=int, help="ivf: number of cells (default ~4*sqrt(N), a power of two)")
    b.add_argument("--nprobe", type=int, help="ivf: cells visited per search (default: tuned to --target-recall)")
    b.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per node")
    b.add_argument("--ef-construction", type=int, default=80, help="hnsw: build-time beam width")
    b.add_argument("--ef-search", type=int, help="hnsw: search beam width (default: tuned to --target-recall)")
    b.add_argument("--target-recall", type=float, default=DEFAULT_TARGET_RECALL)
    b.add_argument("--overwrite", action="store_true", help="replace an existing gallery")

    a = sub.add_parser("add", help="append entries to a gallery")
    common(a)
    a.add_argument("--index", required=True, help="gallery directory")

    s = sub.add_parser("search", help="top-k identities for images or an .npz of probes")
    common(s)
    s.add_argument("--index", required=True, help="gallery directory")
    s.add_argument("--image", nargs="+", help="probe image file(s) (with --checkpoint)")
    s.add_argument("-k", type=int, default=5, help="identities to return per probe")
    s.add_argument("--nprobe", type=int, help="override the gallery's ivf nprobe")
    s.add_argument("--ef-search", type=int, help="override the gallery's hnsw efSearch")
    s.add_argument("--out", help="write the JSON here instead of stdout")

    i = sub.add_parser("info", help="print gallery.json")
    i.add_argument("--index", required=True)

    im = sub.add_parser("import", help="copy a gallery folder's entries into the service's database (adds to it)")
    im.add_argument("--index", required=True, help="gallery directory (facesiam gallery build)")
    im.add_argument("--db", required=True, help="serve's --gallery folder, a .sqlite file or a postgresql:// URL")
    ex = sub.add_parser("export", help="write the service's database as a gallery folder")
    ex.add_argument("--db", required=True, help="serve's --gallery folder, a .sqlite file or a postgresql:// URL")
    ex.add_argument("--out", required=True, help="gallery directory to write")
    ex.add_argument("--kind", choices=KINDS, default="flat", help="index of the written gallery (default flat)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing gallery")

    return p


@command("gallery")
def main(argv: Optional[Sequence[str]] = None) -> None:
    from ..eval.gallery import Gallery

    args = _parser().parse_args(argv)
    log_to_stderr()

    if args.command == "info":
        print(json.dumps(Gallery.load(args.index).meta, indent=2))
        return
    if args.command in ("import", "export"):
        _move(args)
        return
    if args.command == "build":
        if Path(args.out).exists() and not args.overwrite:
            raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it, or use 'gallery add'")
        data = _inputs(args)
        meta = {"source": args.embeddings or args.data, **{k: v for k, v in data.get("meta", {}).items()
                                                            if k in ("checkpoint", "backbone", "flip", "alignment")}}
        gallery = Gallery.build(data["embeddings"], _entry_identities(data), data["paths"], kind=args.kind,
                                nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                                ef_construction=args.ef_construction, ef_search=args.ef_search,
                                target_recall=args.target_recall, meta=meta)
        gallery.save(args.out)
        log.info("wrote %s (%d entries, %d identities)", args.out, gallery.size, len(gallery.names))
        return
    gallery = Gallery.load(args.index)
    if args.command == "add":
        data = _inputs(args)
        before = gallery.size
        gallery.add(data["embeddings"], _entry_identities(data), data["paths"])
        gallery.save(args.index)
        log.info("added %d entries to %s (now %d entries, %d identities)", gallery.size - before, args.index,
                 gallery.size, len(gallery.names))
        return
    _search(gallery, args)


def _served(target: str) -> str:
    """A database target as facesiam serve names it: a --gallery folder means its gallery.sqlite."""
    from ..service.store import database_target

    url = target.startswith(("postgresql://", "postgres://"))
    return target if url else database_target(target, None)


def _move(args) -> None:
    """gallery import / export: between the folder format and the service's database."""
    from ..eval._tensors import progress_bar
    from ..eval.gallery import Gallery
    from ..service.database import open_database

    if args.command == "import":
        gallery = Gallery.load(args.index)
        target = _served(args.db)
        if not target.startswith(("postgresql://", "postgres://")):
            Path(target).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = open_database(target, gallery.index.d)
        try:
            with progress_bar(gallery.size, "import", True, unit="face") as bar:
                db.add_many([gallery.names[i] for i in gallery.identity], gallery.vectors(),
                            [p or "imported" for p in gallery.paths], gallery.meta.get("checkpoint", ""), bar.update)
        finally:
            db.close()
        log.info("imported %d faces of %d identities from %s into %s", gallery.size, len(gallery.names), args.index,
                 db.describe())
        return
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    db = open_database(_served(args.db), None, create=False)
    try:
        rows = list(db.export())
    finally:
        db.close()
    if not rows:
        raise InputError(f"{db.describe()} holds no faces: nothing to export")
    _, names, vectors, sources, models, _ = zip(*rows)
    gallery = Gallery.build(np.stack(vectors), list(names), list(sources), kind=args.kind,
                            meta={"checkpoint": models[0], "source": db.describe()})
    gallery.save(args.out)
    log.info("exported %d faces of %d identities from %s to %s", gallery.size, len(gallery.names), db.describe(),
             args.out)


def _search(gallery, args) -> None:
    """gallery search: top-k identities of image files or an .npz of probes, as JSON."""
    if args.nprobe and gallery.kind == "ivf":
        gallery._set_knob(args.nprobe)
    if args.ef_search and gallery.kind == "hnsw":
        gallery._set_knob(args.ef_search)
    if args.image:
        if not (args.checkpoint or args.onnx):
            raise InputError("gallery search --image needs --checkpoint or --onnx (the model the gallery was built "
                             "with)")
        from ..eval.embed import embed_images

        queries = embed_images(args.checkpoint, args.image, flip=args.flip, device=args.device, align=args.align,
                               onnx=args.onnx)
        names = list(args.image)
    elif args.embeddings:
        from ..eval.embed import load_embeddings

        probes = load_embeddings(args.embeddings)
        queries = probes["embeddings"]
        names = probes["paths"] or [f"{args.embeddings}[{i}]" for i in range(len(queries))]
    else:
        raise InputError("gallery search: pass --image IMG (with --checkpoint) or --embeddings probes.npz")
    if queries.shape[1] != gallery.index.d:
        raise InputError(f"gallery search: probes have dimension {queries.shape[1]}, the gallery {gallery.index.d}; "
                         f"use the model the gallery was built with ({gallery.meta.get('checkpoint', '?')})")
    t0 = time.time()
    hits = gallery.search(queries, args.k, device=args.device, progress=len(queries) > 10000)
    seconds = time.time() - t0
    exact = gallery.kind == "flat"
    result = {"gallery": str(args.index), "kind": gallery.kind, "exact": exact,
              "recall_at_1_estimate": gallery.meta.get("recall_at_1_estimate"),
              "params": gallery.meta.get("params", {}), "k": args.k,
              "results": [{"probe": n, "matches": h} for n, h in zip(names, hits)]}
    text = json.dumps(result, indent=2)
    if args.out:
        write_text(args.out, text + "\n")
    else:
        print(text)
    log.info("searched %d probe(s) in %d entries (%s%s) in %.2fs", len(queries), gallery.size, gallery.kind,
             "" if exact else ", " + gallery.recall_note(), seconds)

