"""Evaluate embeddings or a model: the one entry point that training validation, the evaluate command and the demo
all call.

    data = embed_path("RUN/best", "shards/", split="val")      # or load_embeddings("emb.npz")
    metrics = evaluate(data, pairs_file="pairs.txt")            # the metrics.json structure
    write_report_dir(metrics, "REPORT")                         # metrics.json first, then figures and report.md

Protocols (default: verification and identification, plus pairs when a pairs file is given): verification =
every genuine and impostor pair of distinct images (AUC, EER, TAR@FAR 1e-1..1e-6); identification = closed set
(gallery: first image in path order of each identity with >= 2 images, probes: the rest; rank-1/5, CMC, MAP@R),
open set with ``unenrolled`` (FNIR@FPIR); pairs = an LFW-format pairs file (10-fold accuracy with the threshold
chosen on the other folds, AUC, TAR@FAR). See facesiam.eval.metrics for the method.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..errors import InputError
from .metrics import evaluate_embeddings
from .verification import DEFAULT_BINS

PROTOCOLS = ("verification", "identification", "pairs")

# Credits for the shared real-face data sets: a report with numbers on them must cite them.
DATA_CREDITS = {
    "lfw": "Labeled Faces in the Wild: G. B. Huang, M. Ramesh, T. Berg, E. Learned-Miller, UMass Amherst TR 07-49, "
           "2007 (deep-funneled images: Huang, Mattar, Lee, Learned-Miller, NIPS 2012). For research benchmarking.",
    "orl": "The ORL (AT&T) face database, Olivetti Research Laboratory, Cambridge (F. Samaria, A. Harter, "
           "IEEE WACV 1994).",
    "yale": "The Yale Face Database (Belhumeur, Hespanha, Kriegman, 1997).",
}


def data_credit(data: Optional[str]) -> Optional[str]:
    """The citation of a shared real-face data set, judged by the data path's name (lfw*, orl*, yale*), or for
    local shards by the photo folder they were made from (dataset.json's sources: fit's RUN/shards of Yale)."""
    if not data:
        return None
    names = [Path(data).name]
    try:
        meta = json.loads((Path(data) / "dataset.json").read_text())
        names += [Path(p).name for p in ((meta.get("alignment") or {}).get("source"), meta.get("source")) if p]
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # not local shards: the path's own name decides
    for name in names:
        credit = next((text for key, text in DATA_CREDITS.items() if name.lower().startswith(key)), None)
        if credit:
            return credit
    return None


def evaluate(data: dict, *, protocols: Optional[Sequence[str]] = None, pairs_file: Optional[str] = None,
             unenrolled: Union[int, float, None] = None, bins: int = DEFAULT_BINS, device: Optional[str] = None,
             progress: bool = False) -> dict:
    """Metrics of an embeddings set: ``data`` holds embeddings, labels, paths (or None), classes and meta, as
    ``embed_path`` and ``load_embeddings`` return it. Returns the metrics.json structure, with ``source`` (what
    was evaluated, from data["meta"]) and ``timing``."""
    protocols = list(protocols or (["verification", "identification"] + (["pairs"] if pairs_file else [])))
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise InputError(f"unknown protocol {unknown[0]!r}: choose from {', '.join(PROTOCOLS)}")
    if "pairs" in protocols and not pairs_file:
        raise InputError("the pairs protocol needs a pairs file: pass --pairs PAIRS_FILE")
    if "pairs" in protocols and data.get("paths") is None:
        source = (data.get("meta") or {}).get("file", "the embeddings file")
        raise InputError(f"{source} has no 'paths' array, which --pairs needs to find the pairs' images; make the "
                         "file with tools/embed.py (it writes paths), or evaluate without --pairs")
    timing: dict[str, float] = dict((data.get("meta") or {}).get("timing", {}))
    t0 = time.time()
    metrics = evaluate_embeddings(data["embeddings"], data["labels"], data.get("paths"), unenrolled=unenrolled,
                                  device=device, progress=progress, bins=bins,
                                  protocols=[p for p in protocols if p != "pairs"])
    timing["score"] = time.time() - t0
    if "pairs" in protocols:
        from .pairs import evaluate_pairs_file

        t1 = time.time()
        metrics["pairs"] = evaluate_pairs_file(pairs_file, data["embeddings"], data["paths"], data["labels"],
                                               data["classes"])
        timing["pairs"] = time.time() - t1
    metrics["source"] = describe_source(data)
    metrics["timing"] = timing
    return metrics


def describe_source(data: dict) -> dict[str, Any]:
    """What a report says was evaluated: model, data, split, flip, backbone, alignment, size, the data's credit."""
    meta = data.get("meta") or {}
    emb = data["embeddings"]
    source = {"date": datetime.now().astimezone().isoformat(timespec="seconds"),
              "embeddings": meta.get("file"), "checkpoint": meta.get("checkpoint"), "data": meta.get("data"),
              "split": meta.get("split"), "flip": meta.get("flip", False), "backbone": meta.get("backbone"),
              "alignment": meta.get("alignment"),
              "embedding_dim": int(emb.shape[1]) if getattr(emb, "ndim", 0) == 2 else None}
    source["data_credit"] = data_credit(source["data"])
    return source


def evaluate_model(checkpoint: str, data: str, *, split: str = "val", flip: bool = False, batch_size: int = 128,
                   num_workers: int = 0, accelerator: Any = None, device: Optional[str] = None,
                   align: bool = True, **options: Any) -> Optional[dict]:
    """Embed DATA with the exported model (on every process under accelerate) and evaluate it (main process);
    other processes return None. ``options`` go to ``evaluate``."""
    from .embed import embed_path

    t0 = time.time()
    embedded = embed_path(checkpoint, data, split=split, flip=flip, batch_size=batch_size, num_workers=num_workers,
                          accelerator=accelerator, device=device, align=align)
    if accelerator is not None and not accelerator.is_main_process:
        return None
    embedded["meta"]["timing"] = {"embed": time.time() - t0}
    return evaluate(embedded, device=device, **options)
