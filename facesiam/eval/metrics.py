"""Exact face-recognition metrics at scale: all-pairs 1:1 verification, closed/open-set 1:N identification, MAP@R.

Scores are cosine similarities of L2-normalised embeddings. Nothing here holds an N x N matrix:

* Verification scores every unordered pair of images (N^2/2 of them) block by block with one matmul per block and
  counts them into genuine/impostor histograms on a fine fixed grid over [-1, 1] (2**16 bins by default). The
  ROC computed from the histograms is the exact ROC sampled at the bin edges (counts above each edge are exact), so
  AUC, EER and TAR@FAR differ from scikit-learn's exact ``roc_curve`` by at most the share of genuine pairs that fall
  inside one bin (~1e-4 for real face models; tests check 1e-3). Memory is O(N*D + bins) at any N.
* Identification (rank-k, CMC, FNIR@FPIR) and MAP@R come from the same score slabs, in the same pass
  (``score_pass``): a ``NeighbourStore`` keeps, per query, only the scores that can still matter (its R best
  candidates for MAP@R, its 20 best gallery entries for CMC, its best gallery score for open-set), with a running
  threshold per query so most slabs are dismissed after one row/column max. Exact: no top-k of a fixed k, no
  full sort, and MAP@R's cost does not grow with the largest identity.

Why hand-written: scikit-learn's ``roc_curve`` needs every score in memory (5e9 floats for 1e5 images), and
pytorch-metric-learning's AccuracyCalculator builds (labels x images) masks and loops over labels in Python; both
are used as references in the tests. This module has no Accelerate inside: it works on CPU or CUDA tensors.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .neighbours import CMC_RANKS, NeighbourStore

DEFAULT_BINS = 1 << 16            # histogram resolution over [-1, 1]: bins of 3.05e-5 in cosine
FAR_TARGETS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
FPIR_TARGETS = (1e-1, 1e-2, 1e-3)
PLOT_HIST_BINS = 200               # coarse genuine/impostor histogram kept in metrics.json for plots
_MARGIN = 2                        # spare bins on each side so fp round-off just past +-1 still lands in range
CHUNK_ELEMENTS = 1 << 22           # CPU: scores computed at a time (a 16 MiB slab: the matmul keeps its speed)

Array = Union[np.ndarray, torch.Tensor]


def far_key(target: float) -> str:
    """The metrics.json key of a FAR/FPIR target: 1e-3 -> "1e-03"."""
    return f"{target:.0e}"


def resolve_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """None -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def normalize(embeddings: Array, device: Union[str, torch.device, None] = None, *,
              normalized: bool = False) -> torch.Tensor:
    """float32 tensor on ``device`` with L2-normalised rows (cosine = dot product).

    ``normalized=True`` trusts the rows to be unit length already and avoids a copy when dtype and device fit
    (a NumPy float32 array on CPU is wrapped, not copied: galleries of 10^6 x 512 stay single).
    """
    x = embeddings if isinstance(embeddings, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(embeddings))
    x = x.to(device=resolve_device(device) if device is not None else x.device, dtype=torch.float32)
    if x.ndim != 2:
        raise InputError(f"embeddings must be an N x D matrix, got shape {tuple(x.shape)}")
    return x if normalized else F.normalize(x, dim=1)


def _progress(total: int, desc: str, enabled: bool, unit: str = "it"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False)


# ------------------------------------------------------------------------------------------- ROC summaries

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


# ------------------------------------------------------------------------------- all-pairs verification

@dataclass
class ScoreHistograms:
    """Genuine and impostor pair counts per bin: bin k holds scores in [edges[k], edges[k] + 2/bins)."""

    genuine: np.ndarray      # float64 counts (unordered pairs)
    impostor: np.ndarray
    bins: int                # resolution over [-1, 1] (there are bins + 2*_MARGIN + 1 bins, margins included)
    n_genuine: int
    n_impostor: int

    @property
    def lower_edges(self) -> np.ndarray:
        half = self.bins // 2
        return (np.arange(len(self.genuine), dtype=np.float64) - _MARGIN - half) / half

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
        k = np.clip(np.arange(len(self.genuine)) - _MARGIN, 0, self.bins - 1) * n // self.bins
        return {"bin_edges": np.linspace(-1, 1, n + 1).tolist(),
                "genuine": np.bincount(k, self.genuine, minlength=n).tolist(),
                "impostor": np.bincount(k, self.impostor, minlength=n).tolist()}


def _bincount(x: torch.Tensor, length: int) -> torch.Tensor:
    counts = torch.bincount(x.reshape(-1), minlength=length)
    if len(counts) > length:  # fp round-off beyond the margin: fold into the top bin
        counts = torch.cat([counts[:length - 1], counts[length - 1:].sum().view(1)])
    return counts


def verification_block(n: int, device: torch.device, workers: int) -> int:
    """Block side for all-pairs scoring of n images (see pair_histograms)."""
    if device.type == "cuda":
        cap = 8192
    else:  # each CPU worker may hold a block x block int32 buffer; keep them together under ~1 GiB
        cap = int(max(512, min(4096, math.sqrt(2**30 / (4 * workers)) // 256 * 256)))
    # Small sets get smaller blocks: a diagonal block is computed whole, so one block for everything would do
    # twice the work needed; with >= 4 blocks per side at most 1/4 is spent on the lower halves.
    return min(cap, max(512, -(-n // 4 // 256) * 256))


def pair_histograms(embeddings: Array, labels: Array, *, bins: int = DEFAULT_BINS,
                    device: Union[str, torch.device, None] = None, block_size: Optional[int] = None,
                    progress: bool = False) -> ScoreHistograms:
    """Count every unordered pair of distinct images (genuine: same label) into score histograms."""
    return score_pass(embeddings, labels, bins=bins, device=device, block_size=block_size,
                      progress=progress).histograms


@dataclass
class PassResult:
    """What one pass over every pair produced: histograms (verification) and the kept neighbours (1:N, MAP@R)."""

    histograms: Optional[ScoreHistograms]
    neighbours: Optional[NeighbourStore]
    position: np.ndarray  # position of each input image in the pass's label-sorted order


def score_pass(embeddings: Array, labels: Array, *, bins: Optional[int] = DEFAULT_BINS, map_at_r: bool = False,
               split: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
               device: Union[str, torch.device, None] = None, block_size: Optional[int] = None,
               progress: bool = False) -> PassResult:
    """Score every unordered pair of distinct images once, feeding every metric from each block.

    ``bins``: genuine/impostor histograms at this resolution (None: none); ``map_at_r``: keep what MAP@R needs;
    ``split``: (gallery, mated, non-mated) image indices of the 1:N protocol: keep what their ranks need (see
    facesiam.eval.neighbours).

    Images are sorted by label so that genuine pairs sit in the diagonal blocks (and in the few blocks an identity
    straddles); every other block is impostor-only and costs one matmul, one add, one int cast and one bincount
    (plus a row and a column max when neighbours are kept). Diagonal blocks are computed whole (both orders of
    each pair), off-diagonal ones count twice, and the totals are halved at the end. On CPU, blocks are shared
    among ``torch.get_num_threads()`` worker threads that each run single-threaded kernels: the bincount does not
    parallelise, and this keeps both cores busy.
    """
    if bins is not None and (bins < 2 or bins & (bins - 1)):
        raise InputError(f"bins must be a power of two (exact scaling of the scores), got {bins}")
    dev = resolve_device(device)
    workers = torch.get_num_threads() if dev.type == "cpu" else 1
    if workers == 1:
        return _score_pass(embeddings, labels, bins, map_at_r, split, dev, block_size, progress, 1)
    # Every op of the main thread runs single-threaded too: on a busy machine a parallel region waits for its
    # slowest thread, and small ops (zeros, copies) then cost milliseconds each.
    torch.set_num_threads(1)
    try:
        return _score_pass(embeddings, labels, bins, map_at_r, split, dev, block_size, progress, workers)
    finally:
        torch.set_num_threads(workers)


def _genuine_pairs(emb: torch.Tensor, starts: np.ndarray, sizes: np.ndarray):
    """(rows, cols, scores) of every ordered pair of distinct images of one identity (rows sorted by label):
    one batched matmul per identity size."""
    dev = emb.device
    rows, cols, scores = [], [], []
    for size in np.unique(sizes[sizes >= 2]):
        size = int(size)
        segs = starts[sizes == size]
        ii, jj = torch.nonzero(~torch.eye(size, dtype=torch.bool, device=dev), as_tuple=True)
        per = max(1, (1 << 22) // (size * max(size, emb.shape[1])))  # identities per batched matmul
        for k in range(0, len(segs), per):
            base = torch.as_tensor(segs[k:k + per], device=dev)
            e = emb[base[:, None] + torch.arange(size, device=dev)]
            g = torch.bmm(e, e.transpose(1, 2))
            rows.append((base[:, None] + ii).reshape(-1))
            cols.append((base[:, None] + jj).reshape(-1))
            scores.append(g[:, ii, jj].reshape(-1))
    if not rows:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return empty, empty.clone(), torch.zeros(0, device=dev)
    return torch.cat(rows), torch.cat(cols), torch.cat(scores)


def _neighbour_store(emb: torch.Tensor, lab: np.ndarray, starts: np.ndarray, sizes: np.ndarray, map_at_r: bool,
                     split, position: np.ndarray) -> NeighbourStore:
    dev = emb.device
    n = len(lab)
    kw: dict = {}
    if split is not None:
        gallery, mated, nonmated = (position[np.asarray(a, dtype=np.int64)] for a in split)
        is_gallery = np.zeros(n, bool)
        is_gallery[gallery] = True
        gallery_of = np.full(n, -1, np.int64)
        if len(gallery) and len(mated):
            by_label = dict(zip(lab[gallery].tolist(), gallery.tolist()))
            gallery_of[mated] = [by_label[label] for label in lab[mated].tolist()]
        nm = np.zeros(n, bool)
        nm[nonmated] = True
        # A first guess at each non-mated probe's best gallery score (any gallery image's score is a lower
        # bound): without one, its first block would keep every entry.
        seed = torch.full((n,), -torch.inf, device=dev)
        if len(nonmated) and len(gallery):
            pick = torch.as_tensor(np.random.default_rng(0).permutation(gallery)[:256], device=dev)
            rows = torch.as_tensor(nonmated, device=dev)
            for q0 in range(0, len(rows), 8192):
                q = rows[q0:q0 + 8192]
                seed[q] = (emb[q] @ emb[pick].T).amax(1)
        kw = {"gallery_of": torch.as_tensor(gallery_of, device=dev), "nonmated": torch.as_tensor(nm, device=dev),
              "is_gallery": torch.as_tensor(is_gallery, device=dev), "nonmated_seed": seed}
    genuine = _genuine_pairs(emb, starts, sizes)
    return NeighbourStore(torch.as_tensor(lab, device=dev), genuine, map_at_r=map_at_r, **kw)


def _genuine_cells(seg_of_row: np.ndarray, starts: np.ndarray, ends: np.ndarray, r0: int, r1: int, c0: int, c1: int,
                   diagonal: bool, dev: torch.device):
    """Index ranges (as slices) and flat indices of same-identity cells in block rows [r0,r1) x cols [c0,c1)."""
    if r1 <= r0 or c1 <= c0:
        return [], None
    if diagonal:
        segs = np.arange(seg_of_row[r0], seg_of_row[r1 - 1] + 1)
    else:  # only an identity that runs from this row block into the column block
        s = seg_of_row[r1 - 1]
        if ends[s] <= c0:
            return [], None
        segs = np.array([s])
    a = np.maximum(starts[segs], r0) - r0
    b = np.minimum(ends[segs], r1) - r0
    ca = np.maximum(starts[segs], c0) - c0
    cb = np.minimum(ends[segs], c1) - c0
    h, w = b - a, cb - ca
    big = h * w > 65536  # large identities: bincount a slice instead of gathering millions of indices
    rects = [(int(a[k]), int(b[k]), int(ca[k]), int(cb[k])) for k in np.flatnonzero(big)]
    small = ~big & (h > 0) & (w > 0)
    flat = None
    if small.any():
        a, h, ca, w = a[small], h[small], ca[small], w[small]
        cells = h * w
        rect = np.repeat(np.arange(len(cells)), cells)
        pos = np.arange(cells.sum()) - np.repeat(np.cumsum(cells) - cells, cells)
        rows = a[rect] + pos // w[rect]
        cols = ca[rect] + pos % w[rect]
        flat = torch.as_tensor(rows * (c1 - c0) + cols, device=dev)
    return rects, flat


def _run_tasks(tasks: list, work, workers: int) -> None:
    """work(task iterator) on ``workers`` threads pulling from one shared queue of tasks (or inline for one)."""
    if workers <= 1 or len(tasks) <= 1:
        work(iter(tasks))
        return
    shared = iter(tasks)
    lock = threading.Lock()

    def next_task():
        while True:
            with lock:
                task = next(shared, None)
            if task is None:
                return
            yield task

    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(work, next_task()) for _ in range(workers)]:
            f.result()


def _score_pass(embeddings: Array, labels: Array, bins: Optional[int], map_at_r: bool, split, dev: torch.device,
                block_size: Optional[int], progress: bool, cpu_workers: int) -> PassResult:
    labels = np.asarray(labels).astype(np.int64, copy=False)
    order = np.argsort(labels, kind="stable")
    emb = normalize(embeddings, dev)[torch.as_tensor(order, device=dev)]
    lab = labels[order]
    n = len(lab)
    if emb.shape[0] != n:
        raise InputError(f"{emb.shape[0]} embeddings but {n} labels")
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]]) if n else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], n].astype(np.int64)
    sizes = ends - starts
    n_gen = int(np.sum(sizes * (sizes - 1) // 2))
    n_imp = n * (n - 1) // 2 - n_gen
    store = None
    if map_at_r or split is not None:
        with torch.inference_mode():
            store = _neighbour_store(emb, lab, starts, sizes, map_at_r, split, position)
        if not store.active:
            store = None
    hist = bins is not None
    if not hist and store is None:
        return PassResult(None, store, position)

    half = bins // 2 if hist else 1
    length = bins + 2 * _MARGIN + 1 if hist else 1
    offset = float(half + _MARGIN)
    block = int(block_size or verification_block(n, dev, cpu_workers))
    nb = (n + block - 1) // block
    tasks = [(i, j) for i in range(nb) for j in range(i, nb)]
    seg_of_row = np.repeat(np.arange(len(starts)), sizes)

    acc_lock = threading.Lock()
    totals = {key: torch.zeros(length, dtype=torch.int64, device=dev)
              for key in ("gen_diag", "imp_diag", "gen_off", "imp_off")}

    def work(task_iter, bar):
        if cpu_workers > 1:
            torch.set_num_threads(1)  # per thread: OpenMP's thread count is a per-thread setting
        with torch.inference_mode():
            _work(task_iter, bar)

    def _work(task_iter, bar):
        # CPU: score a block in slabs of about CHUNK_ELEMENTS scores, so that the add, the int cast and the
        # bincount of a slab run on data still in cache (single-threaded: 1.22x a bare matmul instead of 1.56x).
        rows = block if dev.type == "cuda" else max(1, CHUNK_ELEMENTS // block)
        scaled = torch.empty(block, emb.shape[1], device=dev)
        xbuf = torch.empty(rows * block, device=dev)
        cbuf = torch.empty(rows * block, dtype=torch.int32, device=dev)
        ibuf = None  # whole-block bin indices, needed only where genuine pairs are
        local: dict = {}

        def add(key, counts):
            local[key] = counts if key not in local else local[key] + counts

        for i, j in task_iter:
            r0, r1, c0, c1 = i * block, min(n, (i + 1) * block), j * block, min(n, (j + 1) * block)
            h, w = r1 - r0, c1 - c0
            diagonal = i == j
            if hist:
                rects, flat = _genuine_cells(seg_of_row, starts, ends, r0, r1, c0, c1, diagonal, dev)
                slow = diagonal or bool(rects) or flat is not None
                if slow and ibuf is None:
                    ibuf = torch.empty(block * block, dtype=torch.int32, device=dev)
                # Scaling by a power of two is exact: x = half * cosine, the same rounding as the plain product.
                a = torch.mul(emb[r0:r1], float(half), out=scaled[:h])
            else:
                a = emb[r0:r1]
            bt = emb[c0:c1].T
            counts = None
            for s in range(0, h, rows):
                rr = min(rows, h - s)
                x = xbuf[:rr * w].view(rr, w)
                torch.mm(a[s:s + rr], bt, out=x)
                if store is not None:  # the entries some query needs (MAP@R, 1:N), from this slab and its mirror
                    store.search_slab(x, r0 + s, c0, float(half), transposed=not diagonal)
                if not hist:
                    continue
                x.add_(offset)
                q = (ibuf[s * w:(s + rr) * w] if slow else cbuf[:rr * w]).view(rr, w)
                q.copy_(x)  # truncation = floor: every value is >= 0 thanks to the margin
                part = _bincount(q, length)
                counts = part if counts is None else counts.add_(part)
            if not hist or not slow:
                if hist:
                    add("imp_off", counts)
                if bar is not None:
                    with acc_lock:
                        bar.update(h * w if not diagonal else h * (h - 1) // 2)
                continue
            idx = ibuf[:h * w].view(h, w)
            same = torch.zeros(length, dtype=torch.int64, device=dev)
            for ra, rb, ca, cb in rects:
                same += _bincount(idx[ra:rb, ca:cb], length)
            if flat is not None:
                same += _bincount(idx.view(-1)[flat], length)
            if diagonal:
                # `same` holds every identity's square including its diagonal (an image with itself).
                add("gen_diag", same - _bincount(idx.diagonal(), length))
                add("imp_diag", counts.sub_(same))
            else:
                add("gen_off", same)
                add("imp_off", counts.sub_(same))
            if bar is not None:
                with acc_lock:
                    bar.update(h * w if not diagonal else h * (h - 1) // 2)
        with acc_lock:
            for key, value in local.items():
                totals[key] += value

    with _progress(n * (n - 1) // 2, "scoring pairs", progress, unit="pair") as bar:
        _run_tasks(tasks, lambda task_iter: work(task_iter, bar), cpu_workers)
    histograms = None
    if hist:
        gen = (totals["gen_diag"] + 2 * totals["gen_off"]).double().cpu().numpy() / 2.0
        imp = (totals["imp_diag"] + 2 * totals["imp_off"]).double().cpu().numpy() / 2.0
        histograms = ScoreHistograms(genuine=gen, impostor=imp, bins=bins, n_genuine=n_gen, n_impostor=n_imp)
    if store is not None:
        with torch.inference_mode():
            store.compact()
    return PassResult(histograms, store, position)


def verification_metrics(embeddings: Array, labels: Array, *, bins: int = DEFAULT_BINS,
                         device: Union[str, torch.device, None] = None, block_size: Optional[int] = None,
                         progress: bool = False) -> dict:
    """All-pairs 1:1 verification: every genuine and every impostor pair of distinct images."""
    return pair_histograms(embeddings, labels, bins=bins, device=device, block_size=block_size,
                           progress=progress).metrics()


# --------------------------------------------------------------------------------------------- 1:N search

def topk_cosine(queries: Array, reference: Array, k: int, *, exclude: Optional[Array] = None,
                device: Union[str, torch.device, None] = None, normalized: bool = False,
                query_block: Optional[int] = None, reference_block: Optional[int] = None,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k reference rows by cosine for each query: (scores float32 Q x k, indices int64 Q x k).

    Blocked matmul + ``torch.topk`` (a partial selection, never a sort of the whole row), merged across reference
    blocks. ``exclude[q]`` (optional) is a reference index that query q must not return (itself, for
    leave-one-out searches). ``normalized=True``: rows are unit length already (no copies). Results are sorted
    by decreasing score.
    """
    dev = resolve_device(device)
    q = normalize(queries, dev, normalized=normalized)
    ref = normalize(reference, dev, normalized=normalized)
    nq, nr = q.shape[0], ref.shape[0]
    k = int(min(k, nr - (exclude is not None)))
    if k <= 0 or nq == 0:
        return np.zeros((nq, max(k, 0)), np.float32), np.zeros((nq, max(k, 0)), np.int64)
    qb = int(query_block or (8192 if dev.type == "cuda" else 2048))
    rb = int(reference_block or max(k, (2**28 if dev.type == "cuda" else 2**26) // qb))
    excl = None if exclude is None else torch.as_tensor(np.asarray(exclude), dtype=torch.int64, device=dev)
    out_s = torch.empty(nq, k, dtype=torch.float32)
    out_i = torch.empty(nq, k, dtype=torch.int64)
    with torch.inference_mode(), _progress(nq, "search", progress, unit="query") as bar:
        for q0 in range(0, nq, qb):
            qq = q[q0:q0 + qb]
            best_s = best_i = None
            for c0 in range(0, nr, rb):
                s = qq @ ref[c0:c0 + rb].T
                if excl is not None:
                    local = excl[q0:q0 + qb] - c0
                    hit = (local >= 0) & (local < s.shape[1])
                    rows = torch.nonzero(hit).squeeze(1)
                    s[rows, local[rows]] = -torch.inf
                vals, idx = torch.topk(s, min(k, s.shape[1]), dim=1)
                idx += c0
                if best_s is not None:
                    vals, pick = torch.topk(torch.cat([best_s, vals], 1), k, dim=1)
                    idx = torch.gather(torch.cat([best_i, idx], 1), 1, pick)
                best_s, best_i = vals, idx
            out_s[q0:q0 + qb] = best_s.cpu()
            out_i[q0:q0 + qb] = best_i.cpu()
            bar.update(qq.shape[0])
    return out_s.numpy(), out_i.numpy()


def mean_average_precision_at_r(embeddings: Array, labels: Array, *, device: Union[str, torch.device, None] = None,
                                progress: bool = False) -> Optional[float]:
    """MAP@R as defined by pytorch-metric-learning's AccuracyCalculator (Musgrave et al., 2020).

    Every image is a query against all the others; R = the number of other images of its identity; AP@R =
    (1/R) sum_{i<=R} P@i * rel(i); images whose identity has no other image are skipped. None if none remain.
    """
    result = score_pass(embeddings, labels, bins=None, map_at_r=True, device=device, progress=progress)
    return result.neighbours.map_at_r() if result.neighbours is not None else None


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


def identification_metrics(embeddings: Array, labels: Array, paths: Optional[Sequence[str]] = None, *,
                           unenrolled: Union[int, float, None] = None, device: Union[str, torch.device, None] = None,
                           progress: bool = False, map_at_r: bool = True) -> dict:
    """Closed-set (or open-set with ``unenrolled``) 1:N identification: rank-k/CMC, MAP@R, FNIR@FPIR."""
    split = identification_split(labels, paths, unenrolled=unenrolled)
    result = score_pass(embeddings, labels, bins=None, map_at_r=map_at_r, split=split[:3], device=device,
                        progress=progress)
    return _identification_summary(result, split, unenrolled, map_at_r)


def _identification_summary(result: PassResult, split, unenrolled, map_at_r: bool) -> dict:
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


# ------------------------------------------------------------------------------------------------- all

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
        out["identification"] = _identification_summary(result, split, unenrolled, map_at_r=True)
    return out
