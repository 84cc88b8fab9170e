"""Embed a data set with a trained model: batched, on every process under accelerate, optional flip averaging.

    python tools/embed.py --checkpoint RUN/best --data DATA [--split val] --out emb.npz [--flip]
    accelerate launch tools/embed.py ...        # each process embeds its share; the main one writes the file

The .npz holds ``embeddings`` (N x D float32, L2-normalised), ``labels`` (N int64), ``paths`` (N str, relative,
as in the ImageFolder or the shard index), ``classes`` (identity names, indexed by label) and ``meta`` (JSON:
model, data, split, flip).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from .cli import one_line_errors

log = logging.getLogger("facesiam.embed")

EMBEDDING_KEYS = ("embeddings", "labels", "paths", "classes")


def _embed(model: torch.nn.Module, images: torch.Tensor, flip: bool) -> torch.Tensor:
    emb = model(images).float()
    if flip:  # LFW convention: sum with the mirrored face's embedding, then re-normalise
        emb = emb + model(torch.flip(images, dims=[3])).float()
    return F.normalize(emb, dim=1)


def embed_dataset(model: torch.nn.Module, dataset, *, batch_size: int = 128, num_workers: int = 0,
                  flip: bool = False, accelerator: Any = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 N x D, labels int64 N) in dataset order.

    ``dataset[i] -> (image tensor, label)``. With an accelerate ``Accelerator``, process r embeds the r-th
    contiguous share and the shares are gathered, so every process returns all N rows. The model runs in eval
    mode (its previous mode is restored) on the accelerator's device, else on the device of its parameters.
    """
    n = len(dataset)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    share = math.ceil(n / world) if n else 0
    lo, hi = min(n, rank * share), min(n, (rank + 1) * share)
    loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    show = progress and (accelerator is None or accelerator.is_main_process)
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    chunks, labels = [], []
    t0 = time.time()
    try:
        with torch.inference_mode():
            for images, batch_labels in tqdm(loader, desc="embed", unit="batch", disable=not show, leave=False):
                chunks.append(_embed(model, images.to(device, non_blocking=True), flip))
                labels.append(torch.as_tensor(batch_labels, dtype=torch.int64))
            if not chunks:  # a process without a share still needs D for the gather
                dim = _embed(model, dataset[0][0].unsqueeze(0).to(device), flip).shape[1] if n else 0
                chunks.append(torch.zeros(0, dim, device=device))
                labels.append(torch.zeros(0, dtype=torch.int64))
    finally:
        model.train(was_training)
    local = torch.cat(chunks)
    local_labels = torch.cat(labels).to(device)
    if world > 1:
        pad = share - local.shape[0]
        local = F.pad(local, (0, 0, 0, pad))
        local_labels = F.pad(local_labels, (0, pad))
        everything = accelerator.gather(local).view(world, share, -1)
        every_label = accelerator.gather(local_labels).view(world, share)
        counts = [max(0, min(n, (r + 1) * share) - r * share) for r in range(world)]
        local = torch.cat([everything[r, :c] for r, c in enumerate(counts)])
        local_labels = torch.cat([every_label[r, :c] for r, c in enumerate(counts)])
    seconds = time.time() - t0
    if show:
        log.info("embedded %d images in %.1fs (%.1f img/s per process, %d process(es)%s)", n, seconds,
                 (hi - lo) / max(seconds, 1e-9), world, ", flip" if flip else "")
    return local.float().cpu().numpy(), local_labels.cpu().numpy().astype(np.int64)


def save_embeddings(path: str | os.PathLike, embeddings: np.ndarray, labels: np.ndarray, paths: Sequence[str],
                    classes: Sequence[str], meta: Optional[dict] = None) -> Path:
    """Write the embeddings .npz atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, embeddings=np.asarray(embeddings, np.float32), labels=np.asarray(labels, np.int64),
                     paths=np.asarray(list(paths), dtype=str), classes=np.asarray(list(classes), dtype=str),
                     meta=np.asarray(json.dumps(meta or {})))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_embeddings(path: str | os.PathLike) -> dict:
    """Read an embeddings .npz: embeddings, labels, paths (list), classes (list), meta (dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {path} not found; make it with tools/embed.py --out {path}")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in EMBEDDING_KEYS if k not in z]
        if missing:
            raise ValueError(f"{path}: missing {missing}; expected the arrays {list(EMBEDDING_KEYS)} "
                             "written by tools/embed.py")
        out = {"embeddings": z["embeddings"].astype(np.float32, copy=False), "labels": z["labels"].astype(np.int64),
               "paths": z["paths"].tolist(), "classes": z["classes"].tolist(),
               "meta": json.loads(str(z["meta"])) if "meta" in z else {}}
    if not (len(out["embeddings"]) == len(out["labels"]) == len(out["paths"])):
        raise ValueError(f"{path}: embeddings, labels and paths differ in length")
    return out


def embed_path(checkpoint: str | os.PathLike, data: str | os.PathLike, *, split: str = "val", flip: bool = False,
               batch_size: int = 128, num_workers: int = 0, accelerator: Any = None, device: Optional[str] = None,
               progress: bool = True) -> dict:
    """Load an exported model, open DATA (ImageFolder or shards) with its eval transform and embed it.

    Returns the dict of ``load_embeddings`` (meta: checkpoint, data, split, flip, backbone, image size).
    """
    from .data import open_dataset
    from .model import eval_transform_for, load_exported

    dev = accelerator.device if accelerator is not None else (device or ("cuda" if torch.cuda.is_available()
                                                                          else "cpu"))
    model, cfg = load_exported(checkpoint, device=dev)
    dataset = open_dataset(data, split=split, transform=eval_transform_for(cfg))
    emb, labels = embed_dataset(model, dataset, batch_size=batch_size, num_workers=num_workers, flip=flip,
                                accelerator=accelerator, progress=progress)
    meta = {"checkpoint": str(checkpoint), "data": str(data), "split": split, "flip": flip,
            "backbone": cfg.backbone, "embedding_dim": cfg.embedding_dim, "image_size": cfg.image_size}
    return {"embeddings": emb, "labels": labels, "paths": list(dataset.paths), "classes": list(dataset.classes),
            "meta": meta}


def launched_accelerator(cpu: bool = False) -> Any:
    """An accelerate Accelerator when started by `accelerate launch`/torchrun with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    # Without CUDA, ranks talk over gloo: Accelerator(cpu=True) (a MULTI_GPU launch config still starts them).
    return Accelerator(cpu=cpu or not torch.cuda.is_available())


def add_model_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--checkpoint/--data/--split/--flip/--batch-size/--num-workers, shared by embed, evaluate and gallery."""
    p.add_argument("--checkpoint", required=required, help="exported model: RUN/best (or a RUN directory)")
    p.add_argument("--data", required=required, help="ImageFolder directory or shard directory (dataset.json)")
    p.add_argument("--split", default="val", help="shard split to embed (ignored for an ImageFolder; default: val)")
    p.add_argument("--flip", action="store_true", help="add the mirrored image's embedding (LFW convention)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")


def _main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="embed", description="Embed an ImageFolder or a shard split with a trained "
                                "model; writes embeddings, labels, paths and classes to an .npz.")
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    accelerator = launched_accelerator(cpu=args.cpu)
    result = embed_path(args.checkpoint, args.data, split=args.split, flip=args.flip, batch_size=args.batch_size,
                        num_workers=args.num_workers, accelerator=accelerator,
                        device="cpu" if args.cpu else None, progress=True)
    if accelerator is None or accelerator.is_main_process:
        save_embeddings(args.out, result["embeddings"], result["labels"], result["paths"], result["classes"],
                        result["meta"])
        log.info("wrote %s: %d x %d embeddings of %d identities", args.out, *result["embeddings"].shape,
                 len(set(result["labels"].tolist())))
    if accelerator is not None:
        accelerator.wait_for_everyone()


main = one_line_errors("embed", _main)


if __name__ == "__main__":
    main()
