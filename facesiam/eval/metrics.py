"""Exact face-recognition metrics of embeddings at scale: all-pairs 1:1 verification, closed/open-set 1:N
identification, MAP@R, each from one pass over the score blocks.

Where each part lives: facesiam.eval.score_pass scores every unordered pair once, block by block (never an N x N
matrix), and feeds each block to the genuine/impostor histograms and to the neighbours each query needs
(facesiam.eval.neighbours); facesiam.eval.verification summarises histograms (or in-memory scores) into AUC, EER,
TAR@FAR; facesiam.eval.identification splits gallery and probes and summarises ranks into rank-k, CMC, FNIR@FPIR.
The functions here take embeddings and labels and return those summaries, each from one pass.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..errors import InputError
from ._tensors import Array
from .identification import identification_split, identification_summary
from .score_pass import score_pass
from .verification import DEFAULT_BINS, ScoreHistograms


def evaluate_embeddings(embeddings: Array, labels: Array, paths: Optional[Sequence[str]] = None, *,
                        unenrolled: Union[int, float, None] = None, device: Union[str, torch.device, None] = None,
                        progress: bool = False, bins: int = DEFAULT_BINS, block_size: Optional[int] = None,
                        protocols: Sequence[str] = ("verification", "identification")) -> dict:
    """The metrics.json structure: n_embeddings, n_identities, verification (all pairs), identification (1:N)."""
    labels = np.asarray(labels).astype(np.int64, copy=False)
    if len(labels) != len(embeddings):
        raise InputError(f"{len(embeddings)} embeddings but {len(labels)} labels")
    out: dict = {"n_embeddings": int(len(labels)), "n_identities": int(len(np.unique(labels)))}
    verification, identification = "verification" in protocols, "identification" in protocols
    split = identification_split(labels, paths, unenrolled=unenrolled) if identification else None
    # One pass over the score matrix feeds the verification histograms, MAP@R and the 1:N ranks (it normalises
    # the embeddings itself, once, in its label-sorted order).
    result = score_pass(embeddings, labels, bins=bins if verification else None, map_at_r=identification,
                        split=split[:3] if split is not None else None, device=device, block_size=block_size,
                        progress=progress)
    if verification:
        out["verification"] = result.histograms.metrics()
    if identification:
        out["identification"] = identification_summary(result, split, unenrolled, map_at_r=True)
    return out


def verification_metrics(embeddings: Array, labels: Array, *, bins: int = DEFAULT_BINS,
                         device: Union[str, torch.device, None] = None, block_size: Optional[int] = None,
                         progress: bool = False) -> dict:
    """All-pairs 1:1 verification: every genuine and every impostor pair of distinct images."""
    return pair_histograms(embeddings, labels, bins=bins, device=device, block_size=block_size,
                           progress=progress).metrics()


def pair_histograms(embeddings: Array, labels: Array, *, bins: int = DEFAULT_BINS,
                    device: Union[str, torch.device, None] = None, block_size: Optional[int] = None,
                    progress: bool = False) -> ScoreHistograms:
    """Count every unordered pair of distinct images (genuine: same label) into score histograms."""
    return score_pass(embeddings, labels, bins=bins, device=device, block_size=block_size,
                      progress=progress).histograms


def identification_metrics(embeddings: Array, labels: Array, paths: Optional[Sequence[str]] = None, *,
                           unenrolled: Union[int, float, None] = None, device: Union[str, torch.device, None] = None,
                           progress: bool = False, map_at_r: bool = True) -> dict:
    """Closed-set (or open-set with ``unenrolled``) 1:N identification: rank-k/CMC, MAP@R, FNIR@FPIR."""
    split = identification_split(labels, paths, unenrolled=unenrolled)
    result = score_pass(embeddings, labels, bins=None, map_at_r=map_at_r, split=split[:3], device=device,
                        progress=progress)
    return identification_summary(result, split, unenrolled, map_at_r)


def mean_average_precision_at_r(embeddings: Array, labels: Array, *, device: Union[str, torch.device, None] = None,
                                progress: bool = False) -> Optional[float]:
    """MAP@R as defined by pytorch-metric-learning's AccuracyCalculator (Musgrave et al., 2020).

    Every image is a query against all the others; R = the number of other images of its identity; AP@R =
    (1/R) sum_{i<=R} P@i * rel(i); images whose identity has no other image are skipped. None if none remain.
    """
    result = score_pass(embeddings, labels, bins=None, map_at_r=True, device=device, progress=progress)
    return result.neighbours.map_at_r() if result.neighbours is not None else None
