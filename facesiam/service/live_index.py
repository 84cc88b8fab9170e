"""The service's in-memory search index, keyed by face id and changed in place (no rebuild on enrol or delete).

    flat   faiss.IndexIDMap(IndexFlatIP): exact; add appends into reserved room (the array grows by a quarter when
           full: one copy of every vector per N/4 enrolments instead of on the enrolment that crosses a power of
           two), remove compacts the array (O(N) memmove, in C++)
    ivf    faiss.IndexIVFFlat with the face ids as its own ids: add and remove in place; the cells are trained once,
           at start, from the database (at least 39 faces a cell); nprobe tuned to a recall@1 target as
           facesiam gallery build does (eval/gallery.py)
    hnsw   faiss.IndexIDMap2(IndexHNSWFlat): HNSW cannot remove, so a removed face is hidden (searches ask for
           more and drop it) until the next start rebuilds the graph from the database

Search results are face ids; the gallery store (service/store.py) maps them to identities.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import numpy as np

from ..errors import InputError
from ..eval.gallery import DEFAULT_TARGET_RECALL, default_nlist, topk_cosine, trained_ivf

log = logging.getLogger("facesiam.serve")

INDEX_KINDS = ("flat", "ivf", "hnsw")
MIN_TRAIN_PER_CELL = 39  # FAISS's own warning threshold for k-means
RECALL_QUERIES = 500


def _faiss():
    import faiss

    return faiss


class LiveIndex:
    """Unit embeddings by face id: ``add``, ``remove``, ``search`` (thread-safe: one lock, each call is short)."""

    def __init__(self, dim: int, kind: str = "flat", *, vectors: Optional[np.ndarray] = None,
                 ids: Optional[np.ndarray] = None, nprobe: Optional[int] = None, ef_search: Optional[int] = None,
                 target_recall: float = DEFAULT_TARGET_RECALL, hnsw_m: int = 32):
        if kind not in INDEX_KINDS:
            raise InputError(f"unknown index kind {kind!r}: use one of {', '.join(INDEX_KINDS)}")
        faiss = _faiss()
        vectors = np.zeros((0, dim), np.float32) if vectors is None else np.ascontiguousarray(vectors, np.float32)
        ids = np.zeros(0, np.int64) if ids is None else np.ascontiguousarray(ids, np.int64)
        self.dim, self._lock, self._hidden = dim, threading.Lock(), set()
        self.note = ""
        t0 = time.perf_counter()
        if kind == "ivf":
            nlist = default_nlist(len(vectors))
            if len(vectors) < MIN_TRAIN_PER_CELL * 2:
                self.note = (f"ivf needs at least {MIN_TRAIN_PER_CELL * 2} faces to train its cells; "
                             f"searching exactly (flat) until a restart finds enough")
                kind = "flat"
            else:
                self.index = trained_ivf(vectors, nlist)
                self.index.set_direct_map_type(faiss.DirectMap.Hashtable)  # remove_ids by id without a scan
        self._room = 0  # flat: rows the vector array holds without growing
        if kind == "flat":
            self.index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
        elif kind == "hnsw":
            base = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efConstruction = 80
            self.index = faiss.IndexIDMap2(base)
        self.kind = kind
        if len(vectors):
            self.index.add_with_ids(vectors, ids)
        self._make_room(0)
        if kind != "flat":
            self.recall = self._tune(vectors, ids, nprobe if kind == "ivf" else ef_search, target_recall)
        else:
            self.recall = 1.0
        log.info("index: %s over %d faces in %.1f s%s", kind, len(ids), time.perf_counter() - t0,
                 f" ({self.describe()})" if kind != "flat" else "")

    @property
    def size(self) -> int:
        return int(self.index.ntotal) - len(self._hidden)

    def describe(self) -> str:
        knob = {"ivf": lambda: f"nlist {self.index.nlist}, nprobe {self.index.nprobe}",
                "hnsw": lambda: f"efSearch {faiss_hnsw(self.index).efSearch}"}.get(self.kind, lambda: "exact")()
        return f"{self.kind}, {knob}, estimated recall@1 {self.recall:.3f}" + (f"; {self.note}" if self.note else "")

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, np.int64)
        with self._lock:
            self._make_room(len(ids))
            self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids)

    def _make_room(self, adding: int) -> None:
        """Flat: grow the vector array by a quarter (at least 10,000 rows) when ``adding`` rows would not fit.

        FAISS appends to a std::vector, which doubles when full: at a million faces one enrolment would copy 2 GB
        (about a second, holding every search). Growing ahead of time keeps that copy off the enrolments, except
        the one in N/4 that finds the room used up. (resize up then down: std::vector keeps the capacity.)"""
        if self.kind != "flat":
            return
        rows = int(self.index.ntotal)
        if rows + adding <= self._room:
            return
        codes = _faiss().downcast_index(self.index.index).codes
        used = codes.size()
        self._room = rows + adding + max(10_000, rows // 4)
        codes.resize(self._room * self.dim * 4)
        codes.resize(used)

    def remove(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, np.int64)
        with self._lock:
            if self.kind == "hnsw":
                self._hidden.update(int(i) for i in ids)
            else:
                self.index.remove_ids(ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores Q x k, face ids Q x k; -1 where fewer exist), best first."""
        q = np.ascontiguousarray(queries, np.float32)
        with self._lock:
            total = int(self.index.ntotal)
            if total == 0 or k <= 0:
                return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
            hidden = self._hidden
            scores, ids = self.index.search(q, int(min(total, k + len(hidden))))
        if hidden:
            keep = ~np.isin(ids, np.fromiter(hidden, np.int64, len(hidden)))
            scores = np.stack([np.r_[s[m], np.full(len(s) - m.sum(), -np.inf, np.float32)] for s, m in zip(scores, keep)])
            ids = np.stack([np.r_[i[m], np.full(len(i) - m.sum(), -1, np.int64)] for i, m in zip(ids, keep)])
        return scores[:, :k], ids[:, :k]

    def _tune(self, vectors: np.ndarray, ids: np.ndarray, given: Optional[int], target: float) -> float:
        """The given nprobe / efSearch, else the smallest power of two whose recall@1 estimate (held-out-one
        queries among the faces, against exact search) reaches ``target``."""
        if len(vectors) < 2:
            return 1.0
        pick = np.sort(np.random.default_rng(0).choice(len(vectors), min(RECALL_QUERIES, len(vectors)), replace=False))
        q = np.ascontiguousarray(vectors[pick])
        _, exact = topk_cosine(q, vectors, 1, exclude=pick, device="cpu", normalized=True)
        exact_ids = ids[exact[:, 0]]
        limit = self.index.nlist if self.kind == "ivf" else 4096
        values = [given] if given else [v for v in (2 ** p for p in range(13)) if v < limit] + [limit]
        recall = 0.0
        for value in values:
            if self.kind == "ivf":
                self.index.nprobe = int(value)
            else:
                faiss_hnsw(self.index).efSearch = int(value)
            _, found = self.index.search(q, 2)
            first_other = np.where(found[:, 0] == ids[pick], found[:, 1], found[:, 0])
            recall = float(np.mean(first_other == exact_ids))
            if recall >= target:
                break
        return recall


def faiss_hnsw(index):
    """The HNSW graph parameters under an IndexIDMap2."""
    return _faiss().downcast_index(index.index).hnsw
