"""Unlabelled photos -> proposed people: clustering at the model's same-person threshold, the folders it writes,
and the scores against known identities (pairwise precision/recall, BCubed).

Methods (``--method``), measured on LFW's held-out people (docs/curate.md):

* ``average`` (default): agglomerative clustering with average linkage (scikit-learn), cut where the mean cosine
  between two groups falls below the same-person threshold. Average linkage asks every pair of a merge to agree on
  average, so one lucky impostor pair cannot join two people; it is the best of the three at the threshold the
  model's evaluation report gives, with no tuning. Up to DENSE_LIMIT photos it uses all pairs; beyond, the
  30-nearest-neighbour graph (eval.gallery.topk_cosine) restricts the merges, so memory stays O(N k).
* ``graph``: connected components of the nearest-neighbour graph with edges above the threshold (scipy). Fast,
  but chaining: N^2 / 2 pairs each pass at the FAR, so false edges grow with the square of the photo count.
* ``hdbscan``: scikit-learn's HDBSCAN (min_cluster_size 2) on cosine distance: no threshold at all, which is
  its strength and, with a model whose scores are calibrated by a report, its weakness.

Photos in clusters smaller than ``min_size`` (and photos without a face) are "unsure".
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..eval.gallery import topk_cosine

METHODS = ("average", "graph", "hdbscan")
DENSE_LIMIT = 20_000  # photos: average linkage over all pairs needs N^2/2 doubles (20,000: 1.6 GB)
GRAPH_NEIGHBOURS = 30
UNSURE = -1


def _knn_graph(e: np.ndarray, k: int, threshold: float | None = None):
    """Symmetric sparse k-NN graph (cosine similarity as weight); only edges >= threshold when one is given."""
    from scipy.sparse import csr_matrix

    n = len(e)
    k = min(k, n - 1)
    scores, index = topk_cosine(e, e, k, exclude=np.arange(n), normalized=True)
    rows = np.repeat(np.arange(n), k)
    keep = np.ones(rows.shape, bool) if threshold is None else scores.ravel() >= threshold
    graph = csr_matrix((scores.ravel()[keep], (rows[keep], index.ravel()[keep])), shape=(n, n))
    return graph.maximum(graph.T)


def cluster_embeddings(embeddings: np.ndarray, threshold: float, method: str = "average",
                       min_size: int = 2) -> np.ndarray:
    """A cluster number per row (0 = largest cluster), UNSURE (-1) for rows in clusters below ``min_size``."""
    if method not in METHODS:
        raise InputError(f"unknown clustering method {method!r}: one of {', '.join(METHODS)}")
    e = np.ascontiguousarray(embeddings, np.float32)
    n = len(e)
    if n < 2:
        raw = np.zeros(n, np.int64)
    elif method == "graph":
        from scipy.sparse.csgraph import connected_components

        raw = connected_components(_knn_graph(e, GRAPH_NEIGHBOURS, threshold), directed=False)[1]
    elif method == "hdbscan":
        from sklearn.cluster import HDBSCAN

        raw = HDBSCAN(min_cluster_size=2, metric="cosine", copy=True).fit_predict(e)
        raw = np.where(raw < 0, raw.max() + 1 + np.arange(n), raw)  # noise: one cluster each
    else:
        from sklearn.cluster import AgglomerativeClustering

        connectivity = None if n <= DENSE_LIMIT else _knn_graph(e, GRAPH_NEIGHBOURS)
        with warnings.catch_warnings():  # a k-NN graph of several components is completed by sklearn: expected
            warnings.simplefilter("ignore", UserWarning)
            raw = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                          distance_threshold=1.0 - threshold,
                                          connectivity=connectivity).fit_predict(e)
    return renumber(raw, min_size)


def renumber(raw: np.ndarray, min_size: int) -> np.ndarray:
    """Clusters numbered by decreasing size (ties: first photo), those below ``min_size`` -> UNSURE."""
    counts = Counter(raw.tolist())
    first = {c: i for i, c in reversed(list(enumerate(raw.tolist())))}
    order = sorted((c for c in counts if counts[c] >= min_size), key=lambda c: (-counts[c], first[c]))
    number = {c: k for k, c in enumerate(order)}
    return np.asarray([number.get(c, UNSURE) for c in raw.tolist()], np.int64)


def as_partition(clusters: np.ndarray) -> np.ndarray:
    """Cluster ids where every UNSURE photo is a cluster of its own (how the scores count them)."""
    clusters = np.asarray(clusters, np.int64)
    alone = clusters == UNSURE
    out = clusters.copy()
    out[alone] = clusters.max(initial=0) + 1 + np.arange(int(alone.sum()))
    return out


def cluster_scores(clusters: Sequence[int], truth: Sequence[str]) -> dict[str, float]:
    """Pairwise precision/recall/F (pairs put together / pairs of one person) and BCubed precision/recall/F
    (Bagga & Baldwin 1998: per photo, the share of its cluster that is its person and of its person in its
    cluster, averaged), with each UNSURE photo a cluster of its own."""
    pred = as_partition(np.asarray(clusters)).tolist()
    truth = list(truth)
    if len(pred) != len(truth):
        raise InputError(f"{len(pred)} clusters for {len(truth)} true identities")
    size_p, size_t, both = Counter(pred), Counter(truth), Counter(zip(pred, truth))
    pairs = lambda c: sum(v * (v - 1) // 2 for v in c.values())  # noqa: E731
    together, same, right = pairs(size_p), pairs(size_t), pairs(both)
    precision_b = float(np.mean([both[(p, t)] / size_p[p] for p, t in zip(pred, truth)])) if pred else 1.0
    recall_b = float(np.mean([both[(p, t)] / size_t[t] for p, t in zip(pred, truth)])) if pred else 1.0
    out = {"pairwise_precision": right / together if together else 1.0,
           "pairwise_recall": right / same if same else 1.0,
           "bcubed_precision": precision_b, "bcubed_recall": recall_b}
    for kind in ("pairwise", "bcubed"):
        p, r = out[f"{kind}_precision"], out[f"{kind}_recall"]
        out[f"{kind}_f"] = 2 * p * r / (p + r) if p + r else 0.0
    out.update(photos=len(pred), clusters=len(size_p), identities=len(size_t))
    return out
