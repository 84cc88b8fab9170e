"""The one embedding loop: a data set or image files through a trained model, batched, on every process under
accelerate (each embeds its share), optional flip averaging; and the embeddings .npz it writes and reads.

The .npz holds ``embeddings`` (N x D float32, L2-normalised), ``labels`` (N int64), ``paths`` (N str, relative,
as in the ImageFolder or the shard index), ``classes`` (identity names, indexed by label) and ``meta`` (JSON:
model, data, split, flip).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from ..device import resolve_device
from ..embedder import FaceEmbedder
from ..errors import InputError, and_more
from ..fileio import atomic_write

log = logging.getLogger("facesiam.embed")

REQUIRED_KEYS = ("embeddings", "labels")  # classes are derived when absent; paths only --pairs needs
# Seconds a loader worker may take to deliver a batch before it counts as hung (dead, deadlocked): the loader then
# raises in the main process instead of waiting forever. Generous: a batch takes well under a second when healthy.
# Training's loader (training/setup.py) uses the same limit.
LOADER_TIMEOUT = 600.0


def _embed(model: torch.nn.Module, images: torch.Tensor, flip: bool) -> torch.Tensor:
    if flip:
        from ..model import embed_with_mirror  # not at the top: onnx-only paths import this module without timm

        return embed_with_mirror(model, images)
    return F.normalize(model(images).float(), dim=1)


def embed_dataset(model: torch.nn.Module, dataset, *, batch_size: int = 128, num_workers: int = 0,
                  flip: bool = False, accelerator: Any = None, progress: bool = True,
                  loader_timeout: float = LOADER_TIMEOUT,
                  worker_init_fn: Optional[Callable[[int], None]] = None) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 N x D, labels int64 N) in dataset order.

    ``dataset[i] -> (image tensor, label)``. With an accelerate ``Accelerator``, process r embeds the r-th
    contiguous share and the shares are gathered, so every process returns all N rows. The model runs in eval
    mode (its previous mode is restored) on the accelerator's device, else on the device of its parameters.
    With workers, a worker that delivers nothing for ``loader_timeout`` seconds is an error, not a hang;
    ``worker_init_fn`` runs in each (training's validation shields them from stop signals).
    """
    n = len(dataset)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    share = math.ceil(n / world) if n else 0
    lo, hi = min(n, rank * share), min(n, (rank + 1) * share)
    loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=False, timeout=loader_timeout if num_workers else 0,
                        worker_init_fn=worker_init_fn)
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
    with atomic_write(path, "wb") as f:
        np.savez(f, embeddings=np.asarray(embeddings, np.float32), labels=np.asarray(labels, np.int64),
                 paths=np.asarray(list(paths), dtype=str), classes=np.asarray(list(classes), dtype=str),
                 meta=np.asarray(json.dumps(meta or {})))
    return Path(path)


def load_embeddings(path: str | os.PathLike) -> dict:
    """Read an embeddings .npz: embeddings, labels, paths (list, or None when absent), classes (list), meta (dict).

    Only ``embeddings`` and ``labels`` are required: without ``classes`` the identity names are the label numbers;
    without ``paths`` everything but a pairs file can be evaluated (``paths`` is then None).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {path} not found; make it with tools/embed.py --out {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable .npz file ({err}); make it with tools/embed.py --out {path}") from None
    with z:
        missing = [k for k in REQUIRED_KEYS if k not in z]
        if missing:
            raise InputError(f"{path}: no {' or '.join(repr(k) for k in missing)} array; an embeddings file holds "
                             "'embeddings' (N x D) and 'labels' (N), optionally 'paths' and 'classes' "
                             "(tools/embed.py writes all four)")
        embeddings, labels = z["embeddings"].astype(np.float32, copy=False), z["labels"].astype(np.int64)
        paths = z["paths"].tolist() if "paths" in z else None
        classes = (z["classes"].tolist() if "classes" in z
                   else [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)])
        meta = {**(json.loads(str(z["meta"])) if "meta" in z else {}), "file": str(path)}
    if embeddings.ndim != 2 or len(embeddings) != len(labels) or (paths is not None and len(paths) != len(labels)):
        raise InputError(f"{path}: embeddings {embeddings.shape}, labels ({len(labels)}) and paths "
                         f"({'absent' if paths is None else len(paths)}) do not describe the same N images")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise InputError(f"{path}: labels run from {labels.min()} to {labels.max()} but 'classes' names {len(classes)} "
                         "identities")
    return {"embeddings": embeddings, "labels": labels, "paths": paths, "classes": classes, "meta": meta}


def open_as_trained(data: str | os.PathLike, split: str, alignment: Optional[dict], align: bool, *,
                    transform: Any, log_it: bool) -> tuple[Any, str]:
    """(dataset, how it is aligned) for a model trained with ``alignment`` (None: on unaligned images).

    Data that records that it is aligned (dataset.json / alignment.json) is read as it is; raw images are detected
    and aligned on the fly (faces.view.AlignedView); ``align=False``: the images are used as they are.
    """
    from ..data import open_dataset
    from ..faces.aligner import describe_alignment
    from ..faces.record import recorded_alignment
    from ..faces.view import AlignedView

    wanted = alignment if align else None
    if wanted is not None and recorded_alignment(data) is not None:
        dataset, aligned = open_dataset(data, split=split, transform=transform), "recorded in the data"
    elif wanted is not None:
        dataset = AlignedView(open_dataset(data, split=split), wanted, transform)
        aligned = "on the fly: " + describe_alignment(wanted)
    else:
        dataset = open_dataset(data, split=split, transform=transform)
        aligned = "off" if not align else "none (the model was trained on unaligned images)"
    if log_it:
        log.info("alignment: %s%s", aligned, " (--no-align reads the images as they are)" if wanted else "")
    return dataset, aligned


def embed_path(checkpoint: str | os.PathLike, data: str | os.PathLike, *, split: str = "val", flip: bool = False,
               batch_size: int = 128, num_workers: int = 0, accelerator: Any = None, device: Optional[str] = None,
               progress: bool = True, align: bool = True) -> dict:
    """Load an exported model, open DATA (ImageFolder or shards) with its eval transform and embed it.

    A model trained on aligned faces (its config.json records the alignment) sees DATA aligned the same way:
    data that records that it is aligned (dataset.json / alignment.json) is read as it is, raw images are
    detected and aligned on the fly (``align=False``: never, the images are already aligned crops).
    Returns the dict of ``load_embeddings`` (meta: checkpoint, data, split, flip, backbone, image size, alignment).
    """
    from ..model import eval_transform_for, exported_alignment, load_exported

    dev = accelerator.device if accelerator is not None else resolve_device(device)
    model, cfg = load_exported(checkpoint, device=dev)
    dataset, aligned = open_as_trained(data, split, exported_alignment(checkpoint), align,
                                       transform=eval_transform_for(cfg),
                                       log_it=progress and (accelerator is None or accelerator.is_main_process))
    emb, labels = embed_dataset(model, dataset, batch_size=batch_size, num_workers=num_workers, flip=flip,
                                accelerator=accelerator, progress=progress)
    meta = {"checkpoint": str(checkpoint), "data": str(data), "split": split, "flip": flip,
            "backbone": cfg.backbone, "embedding_dim": cfg.embedding_dim, "image_size": cfg.image_size,
            "alignment": aligned}
    return {"embeddings": emb, "labels": labels, "paths": list(dataset.paths), "classes": list(dataset.classes),
            "meta": meta}


def embed_path_onnx(onnx: str | os.PathLike, data: str | os.PathLike, *, split: str = "val", flip: bool = False,
                    batch_size: int = 128, threads: Optional[int] = None, progress: bool = True,
                    align: bool = True) -> dict:
    """``embed_path`` with an ONNX export on onnxruntime (one process): the same data, alignment and result dict.

    The network runs without torch; reading DATA uses facesiam's readers (ImageFolder or shards).
    """
    from ..onnx_runtime import OnnxEmbedder

    embedder = OnnxEmbedder(onnx, threads=threads)
    dataset, aligned = open_as_trained(data, split, embedder.alignment, align, transform=None, log_it=progress)
    t0, n = time.time(), len(dataset)
    emb = embed_pictures(embedder, dataset, batch_size=batch_size, flip=flip, progress=progress)
    if progress:
        log.info("embedded %d images in %.1fs (%.0f images/s, onnxruntime)", n, time.time() - t0,
                 n / max(time.time() - t0, 1e-9))
    meta = {"checkpoint": str(onnx), "data": str(data), "split": split, "flip": flip,
            "backbone": embedder.meta.get("backbone"), "embedding_dim": embedder.embedding_dim,
            "image_size": embedder.image_size, "alignment": aligned, "runtime": "onnxruntime"}
    return {"embeddings": emb, "labels": np.asarray(dataset.labels, np.int64), "paths": list(dataset.paths),
            "classes": list(dataset.classes), "meta": meta}


def embed_pictures(embedder: FaceEmbedder, dataset: Any, *, batch_size: int = 128, flip: bool = False,
                   progress: bool = True) -> np.ndarray:
    """Unit embeddings of every ``dataset[i][0]`` (a picture the network takes as it is), batch by batch in this
    process: the loop for embedders without a torch model (onnxruntime); ``embed_dataset`` is torch's."""
    from tqdm.auto import tqdm

    n = len(dataset)
    out = [np.zeros((0, embedder.embedding_dim), np.float32)]
    for start in tqdm(range(0, n, batch_size), desc="embed (onnxruntime)", unit="batch", disable=not progress):
        out.append(embedder.embed_faces([dataset[i][0] for i in range(start, min(n, start + batch_size))], flip=flip))
    return np.concatenate(out)


def open_embedder(checkpoint: Optional[str | os.PathLike] = None, onnx: Optional[str | os.PathLike] = None, *,
                  device: Optional[str] = None, threads: Optional[int] = None) -> FaceEmbedder:
    """The embedder for an exported checkpoint (torch) or an ONNX export (onnxruntime)."""
    if onnx is not None:
        from ..onnx_runtime import OnnxEmbedder

        return OnnxEmbedder(onnx, threads=threads)
    return TorchEmbedder(checkpoint, device=device)


def launched_accelerator(cpu: bool = False) -> Any:
    """An accelerate Accelerator when started by `accelerate launch`/torchrun with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    # Without CUDA, ranks talk over gloo: Accelerator(cpu=True) (a MULTI_GPU launch config still starts them).
    return Accelerator(cpu=cpu or resolve_device().type != "cuda")


class TorchEmbedder(FaceEmbedder):
    """An exported checkpoint (RUN/best) on torch: ``TorchEmbedder("RUN/best").embed(["a.jpg", "b.jpg"])``."""

    def __init__(self, checkpoint: str | os.PathLike, *, device: Optional[str] = None):
        from ..model import eval_transform_for, exported_alignment, load_exported

        self.device = str(resolve_device(device))  # a str: FaceEmbedder.device also goes to the face detector
        self.model, self.cfg = load_exported(checkpoint, device=self.device)
        self.transform = eval_transform_for(self.cfg)
        self.embedding_dim = self.cfg.embedding_dim
        self.alignment = exported_alignment(checkpoint)

    def embed_faces(self, pictures: Sequence[Any], *, flip: bool = False) -> np.ndarray:
        if not pictures:
            return np.zeros((0, self.embedding_dim), np.float32)
        with torch.inference_mode():
            batch = torch.stack([self.transform(p) for p in pictures]).to(self.device)
            return _embed(self.model, batch, flip).cpu().numpy()


def embed_images(checkpoint: Optional[str | os.PathLike], images: Sequence[str | os.PathLike], *, flip: bool = False,
                 device: Optional[str] = None, batch_size: int = 64, align: bool = True,
                 onnx: Optional[str | os.PathLike] = None) -> np.ndarray:
    """Unit embeddings (len(images) x D float32) of image files, read like the training data, with an exported model.

    A model trained on aligned faces gets each image's face detected and aligned the same way first (an image
    without a usable face is a one-line error naming it); ``align=False`` feeds the images as they are.
    ``onnx``: an ONNX export to run on onnxruntime instead of the checkpoint.
    """
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:  # before loading the model: a typo costs nothing
        raise FileNotFoundError(f"image {missing[0]} not found{and_more(missing)}")
    return open_embedder(checkpoint, onnx, device=device).embed(images, flip=flip, align=align, batch_size=batch_size)
