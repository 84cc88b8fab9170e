"""The one pass over every pair of images: each score block feeds the 1:1 histograms and the 1:N/MAP@R neighbours.

Scores are cosine similarities of L2-normalised embeddings. Nothing here holds an N x N matrix: every unordered
pair of images (N^2/2 of them) is scored block by block with one matmul per block and counted into the
genuine/impostor histograms of facesiam.eval.verification (``ScoreHistograms``); identification (rank-k, CMC,
FNIR@FPIR) and MAP@R come from the same score slabs: a ``NeighbourStore`` (facesiam.eval.neighbours) keeps, per
query, only the scores that can still matter, with a running threshold per query so most slabs are dismissed after
one row/column max. Memory is O(N*D + bins) at any N.

Why hand-written: pytorch-metric-learning's AccuracyCalculator builds (labels x images) masks and loops over labels
in Python (it is a reference in the tests). This module has no Accelerate inside: it works on CPU or CUDA tensors.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from ..device import resolve_device
from ..errors import InputError
from ._tensors import Array, normalize, progress_bar
from .neighbours import NeighbourStore
from .verification import DEFAULT_BINS, HISTOGRAM_MARGIN, ScoreHistograms

CHUNK_ELEMENTS = 1 << 22           # CPU: scores computed at a time (a 16 MiB slab: the matmul keeps its speed)


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


def _score_pass(embeddings: Array, labels: Array, bins: Optional[int], map_at_r: bool, split, dev: torch.device,
                block_size: Optional[int], progress: bool, cpu_workers: int) -> PassResult:
    """score_pass on a resolved device, with the number of CPU worker threads fixed."""
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
    store = None
    if map_at_r or split is not None:
        with torch.inference_mode():
            store = _neighbour_store(emb, lab, starts, sizes, map_at_r, split, position)
        if not store.active:
            store = None
    if bins is None and store is None:
        return PassResult(None, store, position)

    blocks = _BlockPass(emb, starts, ends, bins, store, int(block_size or verification_block(n, dev, cpu_workers)),
                        cpu_workers)
    with progress_bar(n * (n - 1) // 2, "scoring pairs", progress, unit="pair") as bar:
        blocks.run(bar)
    histograms = None
    if bins is not None:
        n_gen = int(np.sum(sizes * (sizes - 1) // 2))
        histograms = blocks.histograms(n_genuine=n_gen, n_impostor=n * (n - 1) // 2 - n_gen)
    if store is not None:
        with torch.inference_mode():
            store.compact()
    return PassResult(histograms, store, position)


class _BlockPass:
    """The upper-triangle blocks of the label-sorted score matrix, and what every worker thread shares: the
    embeddings, the identity segments, the histogram layout, the neighbour store and the totals of the counts.

    Counts are kept in four totals: diagonal blocks are computed whole (both orders of each pair), off-diagonal
    ones once, so ``histograms`` doubles the off-diagonal ones and halves the sum.
    """

    def __init__(self, emb: torch.Tensor, starts: np.ndarray, ends: np.ndarray, bins: Optional[int],
                 store: Optional[NeighbourStore], block: int, cpu_workers: int):
        self.emb, self.starts, self.ends, self.store = emb, starts, ends, store
        self.n, self.dev, self.block, self.cpu_workers = emb.shape[0], emb.device, block, cpu_workers
        self.bins = bins
        self.hist = bins is not None
        # Scores are scaled by half (exact: a power of two) and shifted by offset, so truncation gives the bin.
        self.half = bins // 2 if self.hist else 1
        self.length = bins + 2 * HISTOGRAM_MARGIN + 1 if self.hist else 1
        self.offset = float(self.half + HISTOGRAM_MARGIN)
        self.seg_of_row = np.repeat(np.arange(len(starts)), ends - starts)
        self.lock = threading.Lock()
        self.totals = {key: torch.zeros(self.length, dtype=torch.int64, device=self.dev)
                       for key in ("gen_diag", "imp_diag", "gen_off", "imp_off")}
        self.bar = None

    def run(self, bar) -> None:
        """Score every block once, on ``cpu_workers`` threads sharing one queue of blocks."""
        self.bar = bar
        nb = (self.n + self.block - 1) // self.block
        _run_tasks([(i, j) for i in range(nb) for j in range(i, nb)], self._work, self.cpu_workers)

    def histograms(self, n_genuine: int, n_impostor: int) -> ScoreHistograms:
        """The unordered-pair histograms from the totals (after ``run``)."""
        t = self.totals
        gen = (t["gen_diag"] + 2 * t["gen_off"]).double().cpu().numpy() / 2.0
        imp = (t["imp_diag"] + 2 * t["imp_off"]).double().cpu().numpy() / 2.0
        return ScoreHistograms(genuine=gen, impostor=imp, bins=self.bins, n_genuine=n_genuine, n_impostor=n_impostor)

    def scored(self, pairs: int) -> None:
        """Advance the progress bar (shared by the worker threads)."""
        if self.bar is not None:
            with self.lock:
                self.bar.update(pairs)

    def _work(self, task_iter) -> None:
        if self.cpu_workers > 1:
            torch.set_num_threads(1)  # per thread: OpenMP's thread count is a per-thread setting
        with torch.inference_mode():
            worker = _BlockWorker(self)
            for i, j in task_iter:
                worker.score_block(i, j)
            with self.lock:
                for key, value in worker.counts.items():
                    self.totals[key] += value


class _BlockWorker:
    """One thread's share of a _BlockPass: its own buffers (reused for every block) and counts."""

    def __init__(self, blocks: _BlockPass):
        self.shared = blocks
        dev, block = blocks.dev, blocks.block
        # CPU: score a block in slabs of about CHUNK_ELEMENTS scores, so that the add, the int cast and the
        # bincount of a slab run on data still in cache (single-threaded: 1.22x a bare matmul instead of 1.56x).
        self.rows = block if dev.type == "cuda" else max(1, CHUNK_ELEMENTS // block)
        self.scaled = torch.empty(block, blocks.emb.shape[1], device=dev)
        self.xbuf = torch.empty(self.rows * block, device=dev)
        self.cbuf = torch.empty(self.rows * block, dtype=torch.int32, device=dev)
        self.ibuf: Optional[torch.Tensor] = None  # whole-block bin indices, needed only where genuine pairs are
        self.counts: dict = {}

    def score_block(self, i: int, j: int) -> None:
        """Block (i, j): its scores into the neighbour store and the histogram counts (genuine pairs split out)."""
        p = self.shared
        r0, r1, c0, c1 = i * p.block, min(p.n, (i + 1) * p.block), j * p.block, min(p.n, (j + 1) * p.block)
        h, w = r1 - r0, c1 - c0
        diagonal = i == j
        if p.hist:
            rects, flat = _genuine_cells(p.seg_of_row, p.starts, p.ends, r0, r1, c0, c1, diagonal, p.dev)
            mixed = diagonal or bool(rects) or flat is not None  # holds genuine pairs: keep every bin index
            if mixed and self.ibuf is None:
                self.ibuf = torch.empty(p.block * p.block, dtype=torch.int32, device=p.dev)
            # Scaling by a power of two is exact: x = half * cosine, the same rounding as the plain product.
            a = torch.mul(p.emb[r0:r1], float(p.half), out=self.scaled[:h])
            counts = self._score_slabs(a, p.emb[c0:c1].T, r0, c0, diagonal, mixed)
            if mixed:
                self._split_genuine(counts, rects, flat, h, w, diagonal)
            else:
                self._add("imp_off", counts)
        else:
            self._score_slabs(p.emb[r0:r1], p.emb[c0:c1].T, r0, c0, diagonal, False)
        p.scored(h * w if not diagonal else h * (h - 1) // 2)

    def _score_slabs(self, a: torch.Tensor, bt: torch.Tensor, r0: int, c0: int, diagonal: bool,
                     mixed: bool) -> Optional[torch.Tensor]:
        """Scores of rows ``a`` x columns ``bt``, slab by slab: to the neighbour store, and (with histograms)
        the bin counts of the whole block; a ``mixed`` block keeps each score's bin index in ibuf."""
        p = self.shared
        h, w = a.shape[0], bt.shape[1]
        counts = None
        for s in range(0, h, self.rows):
            rr = min(self.rows, h - s)
            x = self.xbuf[:rr * w].view(rr, w)
            torch.mm(a[s:s + rr], bt, out=x)
            if p.store is not None:  # the entries some query needs (MAP@R, 1:N), from this slab and its mirror
                p.store.search_slab(x, r0 + s, c0, float(p.half), transposed=not diagonal)
            if not p.hist:
                continue
            x.add_(p.offset)
            q = (self.ibuf[s * w:(s + rr) * w] if mixed else self.cbuf[:rr * w]).view(rr, w)
            q.copy_(x)  # truncation = floor: every value is >= 0 thanks to the margin
            part = _bincount(q, p.length)
            counts = part if counts is None else counts.add_(part)
        return counts

    def _split_genuine(self, counts: torch.Tensor, rects: list, flat: Optional[torch.Tensor], h: int, w: int,
                       diagonal: bool) -> None:
        """Split a mixed block's counts into genuine (its same-identity cells) and impostor."""
        length = self.shared.length
        idx = self.ibuf[:h * w].view(h, w)
        same = torch.zeros(length, dtype=torch.int64, device=self.shared.dev)
        for ra, rb, ca, cb in rects:
            same += _bincount(idx[ra:rb, ca:cb], length)
        if flat is not None:
            same += _bincount(idx.view(-1)[flat], length)
        if diagonal:
            # `same` holds every identity's square including its diagonal (an image with itself).
            self._add("gen_diag", same - _bincount(idx.diagonal(), length))
            self._add("imp_diag", counts.sub_(same))
        else:
            self._add("gen_off", same)
            self._add("imp_off", counts.sub_(same))

    def _add(self, key: str, counts: torch.Tensor) -> None:
        self.counts[key] = counts if key not in self.counts else self.counts[key] + counts


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


def verification_block(n: int, device: torch.device, workers: int) -> int:
    """Block side for all-pairs scoring of n images (see pair_histograms)."""
    if device.type == "cuda":
        cap = 8192
    else:  # each CPU worker may hold a block x block int32 buffer; keep them together under ~1 GiB
        cap = int(max(512, min(4096, math.sqrt(2**30 / (4 * workers)) // 256 * 256)))
    # Small sets get smaller blocks: a diagonal block is computed whole, so one block for everything would do
    # twice the work needed; with >= 4 blocks per side at most 1/4 is spent on the lower halves.
    return min(cap, max(512, -(-n // 4 // 256) * 256))


def _bincount(x: torch.Tensor, length: int) -> torch.Tensor:
    counts = torch.bincount(x.reshape(-1), minlength=length)
    if len(counts) > length:  # fp round-off beyond the margin: fold into the top bin
        counts = torch.cat([counts[:length - 1], counts[length - 1:].sum().view(1)])
    return counts
