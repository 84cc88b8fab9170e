"""1:1 verification summaries: the ROC of genuine against impostor scores, AUC, EER, TAR@FAR, average precision.

Two sources feed the same summary (``summarize_roc``): scores held in memory (a pairs file: scikit-learn's exact
ROC, ``score_metrics``), and the genuine/impostor histograms of every unordered pair that the one score pass
counts (facesiam.eval.score_pass) on a fine fixed grid over [-1, 1] (2**16 bins by default, ``ScoreHistograms``).
The ROC computed from the histograms is the exact ROC sampled at the bin edges (counts above each edge are
exact), so AUC, EER and TAR@FAR differ from scikit-learn's exact ``roc_curve`` by at most the share of genuine
pairs that fall inside one bin (~1e-4 for real face models; tests check 1e-3). Memory is O(bins) at any N.

Why hand-written: scikit-learn's ``roc_curve`` needs every score in memory (5e9 floats for 1e5 images); it is the
reference in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ._tensors import Array

DEFAULT_BINS = 1 << 16            # histogram resolution over [-1, 1]: bins of 3.05e-5 in cosine
FAR_TARGETS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
PLOT_HIST_BINS = 200               # coarse genuine/impostor histogram kept in metrics.json for plots
HISTOGRAM_MARGIN = 2               # spare bins on each side so fp round-off just past +-1 still lands in range


def far_key(target: float) -> str:
    """The metrics.json key of a FAR/FPIR target: 1e-3 -> "1e-03"."""
    return f"{target:.0e}"


def equal_error_rate(far: np.ndarray, tar: np.ndarray, thresholds: np.ndarray) -> tuple[float, float]:
    """EER where the ROC polyline (FAR ascending) crosses FRR = FAR, and the threshold there (interpolated)."""
    far, tar, thr = (np.asarray(a, dtype=np.float64) for a in (far, tar, thresholds))
    gap = (1.0 - tar) - far  # FRR - FAR: falls from 1 to -1 along the curve
    after = int(np.argmax(gap <= 0)) if np.any(gap <= 0) else len(gap) - 1
    if after == 0:
        return float(far[0]), float(thr[0])
    before = after - 1
    alpha = gap[before] / (gap[before] - gap[after])
    eer = far[before] + alpha * (far[after] - far[before])
    lo, hi = thr[before], thr[after]
    if not np.isfinite(lo):  # sklearn's first threshold is +inf
        lo = hi
    return float(eer), float(lo + alpha * (hi - lo))


def tar_at_far(far: np.ndarray, tar: np.ndarray, thresholds: np.ndarray, n_impostor: int,
               targets: Sequence[float] = FAR_TARGETS) -> tuple[dict, dict]:
    """Largest TAR over ROC points with FAR <= target (None when n_impostor < 1/target), and its threshold."""
    tars, thrs = {}, {}
    for target in targets:
        key = far_key(target)
        ok = far <= target * (1 + 1e-9)
        if n_impostor * target < 1 - 1e-9 or not np.any(ok):
            tars[key] = thrs[key] = None
            continue
        best = int(np.flatnonzero(ok)[np.argmax(tar[ok])])
        tars[key] = float(tar[best])
        thrs[key] = float(thresholds[best]) if np.isfinite(thresholds[best]) else None
    return tars, thrs


def average_precision(far: np.ndarray, tar: np.ndarray, n_genuine: int, n_impostor: int) -> float:
    """Average precision of 1:1 verification (genuine = positive) from ROC points by decreasing threshold.

    AP = sum over points of (recall_k - recall_{k-1}) * precision_k, the step rule of scikit-learn's
    ``average_precision_score``; precision follows from the ROC because TP = TAR * n_genuine and
    FP = FAR * n_impostor. On sklearn's full ROC it is sklearn's AP; on the histogram ROC it is AP sampled at the
    bin edges (ties inside a bin count as one threshold).
    """
    far, tar = np.asarray(far, dtype=np.float64), np.asarray(tar, dtype=np.float64)
    tp, fp = tar * n_genuine, far * n_impostor
    accepted = tp + fp
    precision = np.divide(tp, accepted, out=np.ones_like(tp), where=accepted > 0)
    return float(np.sum(np.diff(tar, prepend=0.0) * precision))


def summarize_roc(far: np.ndarray, tar: np.ndarray, thresholds: np.ndarray, *, auc: float, n_genuine: int,
                  n_impostor: int) -> dict:
    """The verification summary shared by the all-pairs and the pairs-file protocols.

    ``far``/``tar``/``thresholds``: ROC points by decreasing threshold (accept score >= threshold).
    best_accuracy is class-balanced, (TAR + 1 - FAR) / 2: over all pairs impostors outnumber genuine pairs by
    orders of magnitude, so plain accuracy would only measure how rare genuine pairs are.
    """
    far, tar, thresholds = (np.asarray(a, dtype=np.float64) for a in (far, tar, thresholds))
    eer, eer_thr = equal_error_rate(far, tar, thresholds)
    balanced = (tar + 1.0 - far) / 2.0
    best = int(np.argmax(balanced))
    tars, thrs = tar_at_far(far, tar, thresholds, n_impostor)
    return {
        "n_genuine": int(n_genuine),
        "n_impostor": int(n_impostor),
        "auc": float(auc),
        "average_precision": average_precision(far, tar, n_genuine, n_impostor),
        "eer": eer,
        "eer_threshold": eer_thr,
        "best_accuracy": float(balanced[best]),
        "best_threshold": float(thresholds[best]) if np.isfinite(thresholds[best]) else None,
        "tar_at_far": tars,
        "threshold_at_far": thrs,
        "roc": _curve_for_plots(far, tar, thresholds),
    }


def _curve_for_plots(far: np.ndarray, tar: np.ndarray, thresholds: np.ndarray) -> dict:
    """A few hundred ROC points (log-spaced in FAR, plus a linear sweep) for plots; the metrics use every point."""
    grid = np.unique(np.r_[np.logspace(-8, 0, 161), np.linspace(0, 1, 101)])
    picks = []
    for g in grid:
        ok = np.flatnonzero(far <= g * (1 + 1e-9))
        if len(ok):
            picks.append(int(ok[np.argmax(tar[ok])]))
    picks = sorted(set(picks), key=lambda i: (far[i], tar[i]))
    return {"far": [float(far[i]) for i in picks], "tar": [float(tar[i]) for i in picks],
            "threshold": [float(thresholds[i]) if np.isfinite(thresholds[i]) else None for i in picks]}


def _empty_verification(n_genuine: int, n_impostor: int) -> dict:
    """The summary's keys, all None: no genuine or no impostor pair to rank."""
    return {"n_genuine": int(n_genuine), "n_impostor": int(n_impostor), "auc": None, "average_precision": None,
            "eer": None,
            "eer_threshold": None, "best_accuracy": None, "best_threshold": None,
            "tar_at_far": {far_key(t): None for t in FAR_TARGETS},
            "threshold_at_far": {far_key(t): None for t in FAR_TARGETS}, "roc": None, "score_histogram": None}


def score_metrics(scores: Array, same: Array) -> dict:
    """Exact verification metrics for scores held in memory (a pairs file): scikit-learn's ROC, same summary."""
    from sklearn.metrics import roc_auc_score, roc_curve

    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    n_gen, n_imp = int(same.sum()), int((~same).sum())
    if n_gen == 0 or n_imp == 0:
        return _empty_verification(n_gen, n_imp)
    far, tar, thr = roc_curve(same, scores, drop_intermediate=False)
    out = summarize_roc(far, tar, thr, auc=roc_auc_score(same, scores), n_genuine=n_gen, n_impostor=n_imp)
    edges = np.linspace(-1, 1, PLOT_HIST_BINS + 1)
    out["score_histogram"] = {"bin_edges": edges.tolist(),
                              "genuine": np.histogram(scores[same], edges)[0].astype(float).tolist(),
                              "impostor": np.histogram(scores[~same], edges)[0].astype(float).tolist()}
    return out


@dataclass
class ScoreHistograms:
    """Genuine and impostor pair counts per bin: bin k holds scores in [edges[k], edges[k] + 2/bins)."""

    genuine: np.ndarray      # float64 counts (unordered pairs)
    impostor: np.ndarray
    bins: int                # resolution over [-1, 1] (bins + 2 * HISTOGRAM_MARGIN + 1 of them, margins included)
    n_genuine: int
    n_impostor: int

    @property
    def lower_edges(self) -> np.ndarray:
        half = self.bins // 2
        return (np.arange(len(self.genuine), dtype=np.float64) - HISTOGRAM_MARGIN - half) / half

    def metrics(self) -> dict:
        """AUC, EER, TAR@FAR and best (balanced) accuracy from the histograms; see the module docstring."""
        if self.n_genuine == 0 or self.n_impostor == 0:
            return _empty_verification(self.n_genuine, self.n_impostor)
        g, i = self.genuine, self.impostor
        used = np.flatnonzero((g > 0) | (i > 0))[::-1]  # one ROC point per occupied bin, high scores first
        tp, fp = np.cumsum(g[used]), np.cumsum(i[used])
        tar = np.r_[0.0, tp / tp[-1]]
        far = np.r_[0.0, fp / fp[-1]]
        thresholds = np.r_[np.inf, self.lower_edges[used]]
        # P(genuine > impostor) + P(same bin) / 2: the trapezoid rule over the histogram ROC.
        below = np.cumsum(i) - i
        auc = float(np.sum(g * (below + 0.5 * i)) / (g.sum() * i.sum()))
        out = summarize_roc(far, tar, thresholds, auc=auc, n_genuine=self.n_genuine, n_impostor=self.n_impostor)
        out["score_histogram"] = self.coarse(PLOT_HIST_BINS)
        out["bins"] = int(self.bins)
        return out

    def coarse(self, n: int) -> dict:
        """The histograms summed into n equal bins over [-1, 1] (margins folded into the end bins), for plots."""
        k = np.clip(np.arange(len(self.genuine)) - HISTOGRAM_MARGIN, 0, self.bins - 1) * n // self.bins
        return {"bin_edges": np.linspace(-1, 1, n + 1).tolist(),
                "genuine": np.bincount(k, self.genuine, minlength=n).tolist(),
                "impostor": np.bincount(k, self.impostor, minlength=n).tolist()}
