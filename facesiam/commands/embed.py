"""facesiam embed: embed an ImageFolder or a shard split with a trained model into an .npz.

    python tools/embed.py --checkpoint RUN/best --data DATA [--split val] --out emb.npz [--flip]
    python tools/embed.py --onnx model.onnx --data DATA --out emb.npz     # the network on onnxruntime
    python tools/embed.py --teacher dlib --data SHARDS --split val --out emb.npz   # a distillation teacher
    accelerate launch tools/embed.py ...        # each process embeds its share; the main one writes the file

The .npz holds ``embeddings`` (N x D float32, L2-normalised), ``labels`` (N int64), ``paths`` (N str, relative,
as in the ImageFolder or the shard index), ``classes`` (identity names, indexed by label) and ``meta`` (JSON:
model, data, split, flip).
"""

from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from . import command
from .common import add_model_arguments, log_to_stderr

log = logging.getLogger("facesiam.embed")


@command("embed")
def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="embed", description="Embed an ImageFolder or a shard split with a trained "
                                "model; writes embeddings, labels, paths and classes to an .npz.")
    add_model_arguments(p, onnx=True, teacher=True)
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    args = p.parse_args(argv)
    log_to_stderr()
    from ..eval.embed import embed_path, embed_path_onnx, launched_accelerator, save_embeddings

    if args.teacher:
        return _embed_with_teacher(args)
    accelerator = None if args.onnx else launched_accelerator(cpu=args.cpu)
    if args.onnx:
        result = embed_path_onnx(args.onnx, args.data, split=args.split, flip=args.flip, batch_size=args.batch_size,
                                 align=args.align)
    else:
        result = embed_path(args.checkpoint, args.data, split=args.split, flip=args.flip, batch_size=args.batch_size,
                            num_workers=args.num_workers, accelerator=accelerator,
                            device="cpu" if args.cpu else None, progress=True, align=args.align)
    if accelerator is None or accelerator.is_main_process:
        save_embeddings(args.out, result["embeddings"], result["labels"], result["paths"], result["classes"],
                        result["meta"])
        log.info("wrote %s: %d x %d embeddings of %d identities", args.out, *result["embeddings"].shape,
                 len(set(result["labels"].tolist())))
    if accelerator is not None:
        accelerator.wait_for_everyone()


def _embed_with_teacher(args: argparse.Namespace) -> None:
    """The teacher's embedding of every photo of a shard split (from its cache, or computed once and cached), so a
    teacher is measured on the same photos and protocols as the models distilled from it (``--flip``: with each
    face's mirror image, the cache of distill.teacher_mirror). Photos the teacher found no face in get a zero
    embedding (scored 0 against everything) and are counted."""
    from ..data import ShardDataset
    from ..eval.embed import save_embeddings
    from ..faces.teachers import build_teacher
    from ..training.teacher_pass import teacher_targets

    teacher = build_teacher(args.teacher, size=args.teacher_size, mean=args.teacher_mean, std=args.teacher_std,
                            align=None if args.teacher_align == "auto" else args.teacher_align, mirror=args.flip)
    embeddings, found = teacher_targets(args.data, args.split, teacher, source=args.teacher_source)
    dataset = ShardDataset(args.data, args.split)
    meta = {"teacher": teacher.name, "data": str(args.data), "split": args.split, "no_face": int((~found).sum()),
            "flip": bool(args.flip)}
    save_embeddings(args.out, embeddings * found[:, None], dataset.labels, dataset.paths, dataset.classes, meta)
    log.info("wrote %s: %d x %d teacher embeddings of %d identities (no face found in %d: zero vectors)", args.out,
             *embeddings.shape, len(set(dataset.labels.tolist())), meta["no_face"])
