"""1:N identification: the gallery/probe split, and rank-k, CMC, MAP@R and FNIR@FPIR from one score pass.

Closed set by default: the gallery is the first image (in path order) of each identity with >= 2 images, the probes
are the other images. ``unenrolled`` identities stay out of the gallery (open set, NIST FRVT style): their images
are non-mated probes and FNIR@FPIR is added. The scores every probe needs are kept by the one score pass
(facesiam.eval.score_pass, facesiam.eval.neighbours): exact, no top-k of a fixed k, no full sort.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import InputError
from ._tensors import Array
from .neighbours import CMC_RANKS
from .score_pass import PassResult
from .verification import far_key

FPIR_TARGETS = (1e-1, 1e-2, 1e-3)


def identification_split(labels: Array, paths: Optional[Sequence[str]] = None, *,
                         unenrolled: Union[int, float, None] = None,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(gallery, mated probes, non-mated probes, unenrolled labels) as image indices for the 1:N protocol.

    Gallery: the first image (in path order, else dataset order) of each identity with >= 2 images; mated probes:
    the other images of those identities. ``unenrolled`` (a count, or a fraction in (0, 1)) of those identities,
    drawn with ``seed``, stay out of the gallery and all their images become non-mated probes (open set).
    """
    labels = np.asarray(labels).astype(np.int64, copy=False)
    n = len(labels)
    rank = np.arange(n) if paths is None else np.argsort(np.asarray(paths, dtype=object), kind="stable")
    order = rank[np.argsort(labels[rank], kind="stable")]  # by label, then path order within a label
    lab = labels[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]]) if n else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, n])
    eligible = lab[starts[sizes >= 2]]
    held = np.zeros(0, np.int64)
    if unenrolled:
        count = int(round(unenrolled * len(eligible))) if 0 < unenrolled < 1 else int(unenrolled)
        if count < 0 or count >= len(eligible):
            raise InputError(f"--unenrolled {unenrolled}: choose fewer than the {len(eligible)} identities "
                             "that have at least 2 images")
        held = np.sort(np.random.default_rng(seed).permutation(eligible)[:count])
    first = np.zeros(n, dtype=bool)
    first[order[starts]] = True
    multi = np.isin(labels, eligible)
    out = np.isin(labels, held)
    gallery = np.flatnonzero(first & multi & ~out)
    gallery = gallery[np.argsort(labels[gallery], kind="stable")]
    mated = np.flatnonzero(multi & ~first & ~out)
    nonmated = np.flatnonzero(out)
    return gallery, mated, nonmated, held


def identification_summary(result: PassResult, split: tuple, unenrolled: Union[int, float, None],
                           map_at_r: bool) -> dict:
    """The 1:N metrics dict from a pass that kept the neighbours ``split`` (identification_split's result) needs."""
    gallery, mated, nonmated, held = split
    store = result.neighbours
    out: dict = {"gallery_size": int(len(gallery)), "n_probes": int(len(mated) + len(nonmated)),
                 "rank1": None, "rank5": None, "cmc": None,
                 "map_at_r": store.map_at_r() if map_at_r and store is not None else None}
    if unenrolled:
        out.update({"n_mated_probes": int(len(mated)), "n_nonmated_probes": int(len(nonmated)),
                    "unenrolled_identities": int(len(held)),
                    "fnir_at_fpir": {far_key(t): None for t in FPIR_TARGETS},
                    "threshold_at_fpir": {far_key(t): None for t in FPIR_TARGETS}})
    if len(gallery) == 0 or len(mated) + len(nonmated) == 0:
        return out
    mated_pos, nonmated_pos = result.position[mated], result.position[nonmated]
    rank = store.ranks(mated_pos)
    if len(mated):
        cmc = [float(np.mean(rank <= r)) for r in range(1, CMC_RANKS + 1)]
        out.update({"rank1": cmc[0], "rank5": cmc[4], "cmc": cmc})
    if unenrolled:
        top1_ok = rank == 1
        mated_top = store.own_scores(mated_pos)
        nonmated_top = np.sort(store.best_gallery_scores(nonmated_pos))[::-1]
        for target in FPIR_TARGETS:
            allowed = int(math.floor(target * len(nonmated) + 1e-9))
            if len(nonmated) * target < 1 - 1e-9 or len(mated) == 0:
                continue
            # The lowest threshold with FPIR <= target lies just above the (allowed+1)-th highest non-mated score.
            threshold = float(np.nextafter(nonmated_top[allowed], np.inf)) if allowed < len(nonmated) else -1.0
            fnir = 1.0 - float(np.mean(top1_ok & (mated_top >= threshold)))
            out["fnir_at_fpir"][far_key(target)] = fnir
            out["threshold_at_fpir"][far_key(target)] = threshold
    return out
