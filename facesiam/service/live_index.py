"""The service's in-memory search index, keyed by face id: a write never waits for a search.

Three parts, all keyed by face id:

    main      a FAISS index that nothing changes while searches can see it (flat: IndexIDMap(IndexFlatIP); ivf:
              IndexIVFFlat with the face ids as its own ids, cells trained once at start from the database, at
              least 39 faces a cell; hnsw: IndexIDMap2(IndexHNSWFlat)); nprobe / efSearch tuned to a recall@1
              target as facesiam gallery build does (eval/gallery.py: tune_search)
    delta     the faces enrolled since main was built, searched exactly (numpy); append-only arrays
    removed   the face ids deleted since main was built, filtered out of both (a FAISS IDSelector on main)

A write appends to the delta or adds to the removed set under a lock held for microseconds; a search takes
references to the three under the same lock and searches them without it (FAISS releases the GIL, so searches also
run side by side). A merger thread, off the request path, folds the delta and the removals into a copy of main
and swaps the copy in when the delta passes ``merge_rows`` faces or the removed faces pass ``hidden_share`` of the
index; HNSW cannot remove, so its merge then rebuilds the graph from the faces left. Writes that arrive while a
merge runs stay in the delta and the removed set over the new main: none is lost, none comes back.

Why copy-on-write and not a reader-writer lock over one index changed in place: at 200k 512-d faces on 2 cores a
single search of the flat index took ~100 ms, so any scheme in which a write (or a merge in place) needs the index
to itself waits for the searches in flight, and makes the searches queued behind it wait too (issue 40: 360 ms
p99 through `serve`; in-process, the old single lock starved the writer for seconds: docs/benchmarks.md). A copy
costs memory (main twice, for the length of a merge) and CPU in the background (7 s at 200k on 2 busy cores, with
the searches' p99 within 1.2x of no writes), once per ``merge_rows`` enrolments; the delta's exact search is a
(queries x delta) product, well under a millisecond at 4,096 faces.

Search results are face ids; the gallery store (service/store.py) maps them to identities.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import numpy as np

from ..errors import InputError
from ..eval.gallery import (DEFAULT_TARGET_RECALL, default_nlist, held_out_recall, search_knob, set_search_knob,
                            trained_ivf, tune_search)

log = logging.getLogger("facesiam.serve")

INDEX_KINDS = ("flat", "ivf", "hnsw")
MIN_TRAIN_PER_CELL = 39  # FAISS's own warning threshold for k-means
RECALL_QUERIES = 500
MERGE_ROWS = 4096  # delta faces that start a merge (their exact search: ~0.3 ms a query at 512-d)
HIDDEN_SHARE = 0.1  # removed faces, as a share of the index, that start a merge (HNSW: a rebuild of the graph)
EF_CONSTRUCTION = 80


def _faiss():
    import faiss

    return faiss


class LiveIndex:
    """Unit embeddings by face id: ``add``, ``remove``, ``search``, thread-safe; writes never wait for searches
    (see the module's docstring). The caller adds each id once and removes only ids it added."""

    def __init__(self, dim: int, kind: str = "flat", *, vectors: Optional[np.ndarray] = None,
                 ids: Optional[np.ndarray] = None, nprobe: Optional[int] = None, ef_search: Optional[int] = None,
                 target_recall: float = DEFAULT_TARGET_RECALL, hnsw_m: int = 32, merge_rows: int = MERGE_ROWS,
                 hidden_share: float = HIDDEN_SHARE):
        if kind not in INDEX_KINDS:
            raise InputError(f"unknown index kind {kind!r}: use one of {', '.join(INDEX_KINDS)}")
        faiss = _faiss()
        vectors = np.zeros((0, dim), np.float32) if vectors is None else np.ascontiguousarray(vectors, np.float32)
        ids = np.zeros(0, np.int64) if ids is None else np.ascontiguousarray(ids, np.int64)
        self.dim, self.hnsw_m, self.merge_rows, self.hidden_share = dim, hnsw_m, merge_rows, hidden_share
        self.note = ""
        t0 = time.perf_counter()
        if kind == "ivf" and len(vectors) < MIN_TRAIN_PER_CELL * 2:
            self.note = (f"ivf needs at least {MIN_TRAIN_PER_CELL * 2} faces to train its cells; "
                         f"searching exactly (flat) until a restart finds enough")
            kind = "flat"
        if kind == "ivf":
            main = trained_ivf(vectors, default_nlist(len(vectors)))
            main.set_direct_map_type(faiss.DirectMap.Hashtable)  # remove_ids by id without a scan
        elif kind == "flat":
            main = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
        else:
            main = self._empty_hnsw()
        self.kind = kind
        if len(vectors):
            main.add_with_ids(vectors, ids)
        self.recall = 1.0
        if kind != "flat":
            _, self.recall = tune_search(main, kind, nprobe if kind == "ivf" else ef_search, target_recall,
                                         lambda: _face_recall(main, vectors, ids))
        # what a search reads, swapped whole under _state (never changed in place once a search can see it)
        self._state = threading.Lock()
        self._main = main
        self._dx, self._dids, self._dn = np.zeros((64, dim), np.float32), np.zeros(64, np.int64), 0
        self._gone: frozenset[int] = frozenset()
        self._selector: tuple = (frozenset(), None)  # (the removed set it excludes, the FAISS selector)
        self._merge_lock, self._merger = threading.Lock(), None
        self.merges = 0
        log.info("index: %s over %d faces in %.1f s%s", kind, len(ids), time.perf_counter() - t0,
                 f" ({self.describe()})" if kind != "flat" else "")

    def _empty_hnsw(self):
        faiss = _faiss()
        base = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = EF_CONSTRUCTION
        return faiss.IndexIDMap2(base)

    @property
    def size(self) -> int:
        with self._state:
            return int(self._main.ntotal) + self._dn - len(self._gone)

    @property
    def pending(self) -> tuple[int, int]:
        """(faces in the delta, removed faces still held): what the next merge folds in."""
        with self._state:
            return self._dn, len(self._gone)

    def face_ids(self) -> np.ndarray:
        """Every face id a search can return now, sorted (for checks: O(N))."""
        with self._state:
            main, dids, gone = self._main, self._dids[:self._dn].copy(), self._gone
        ids = np.concatenate([_ids_of(main), dids])
        return np.sort(ids[~np.isin(ids, np.fromiter(gone, np.int64, len(gone)))])

    def describe(self) -> str:
        main, value = self._main, search_knob(self._main, self.kind)
        knob = (f"nlist {_faiss().extract_index_ivf(main).nlist}, nprobe {value}" if self.kind == "ivf" else
                f"efSearch {value}" if self.kind == "hnsw" else "exact")
        return f"{self.kind}, {knob}, estimated recall@1 {self.recall:.3f}" + (f"; {self.note}" if self.note else "")

    # ------------------------------------------------------------------ writes: microseconds under _state
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, np.int64)
        x = np.ascontiguousarray(vectors, np.float32).reshape(len(ids), self.dim)
        with self._state:
            n = self._dn
            if n + len(ids) > len(self._dids):  # a new, larger array: searches keep reading the old one
                room = max(2 * len(self._dids), n + len(ids))
                self._dx = np.concatenate([self._dx[:n], np.zeros((room - n, self.dim), np.float32)])
                self._dids = np.concatenate([self._dids[:n], np.zeros(room - n, np.int64)])
            self._dx[n:n + len(ids)] = x  # rows past _dn: no search reads them yet
            self._dids[n:n + len(ids)] = ids
            self._dn = n + len(ids)
        self._merge_when_due()

    def remove(self, ids: np.ndarray) -> None:
        with self._state:
            self._gone = self._gone | {int(i) for i in np.asarray(ids).ravel()}
        self._merge_when_due()

    # ------------------------------------------------------------------ search: never waits for a write
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores Q x k, face ids Q x k; -inf / -1 where fewer exist), best first."""
        q = np.ascontiguousarray(queries, np.float32)
        with self._state:
            main, dx, dids, gone = self._main, self._dx[:self._dn], self._dids[:self._dn], self._gone
        total = int(main.ntotal) + len(dids)
        k = int(min(k, total))
        if total == 0 or k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        scores, found = self._search_main(main, q, min(k, int(main.ntotal)), gone)
        if len(dids):
            ds, di = _exact(q, dx, dids, k, gone)
            scores, found = np.concatenate([scores, ds], 1), np.concatenate([found, di], 1)
        scores = np.where(found < 0, -np.inf, scores).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(found, order, 1)

    def _search_main(self, main, q: np.ndarray, k: int, gone: frozenset) -> tuple[np.ndarray, np.ndarray]:
        if k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if not gone:
            return main.search(q, k)
        faiss = _faiss()
        selector = self._excluding(gone)
        # parameters per call: IndexIDMap swaps its selector in and out of them during a search
        if self.kind == "ivf":
            params = faiss.SearchParametersIVF(sel=selector[1], nprobe=search_knob(main, "ivf"))
        elif self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=selector[1], efSearch=search_knob(main, "hnsw"))
        else:
            params = faiss.SearchParameters(sel=selector[1])
        # faiss.contrib.torch_utils (imported by pytorch-metric-learning's utils.inference) replaces every Index.search
        # with one that takes no ``params``; faiss keeps the original as search_numpy.
        return getattr(main, "search_numpy", main.search)(q, k, params=params)

    def _excluding(self, gone: frozenset) -> tuple:
        """(the ids, a FAISS selector of every id not in ``gone``), made once per removed set."""
        cached = self._selector
        if cached[0] is not gone:
            faiss = _faiss()
            batch = faiss.IDSelectorBatch(np.fromiter(gone, np.int64, len(gone)))
            cached = (gone, faiss.IDSelectorNot(batch), batch)  # batch kept alive beside the selector using it
            self._selector = cached
        return cached

    # ------------------------------------------------------------------ merging, off the request path
    def _merge_when_due(self) -> None:
        if self._due() and (self._merger is None or not self._merger.is_alive()):
            self._merger = threading.Thread(target=self._merge_while_due, name="index-merge", daemon=True)
            self._merger.start()

    def _due(self) -> bool:
        with self._state:
            live = int(self._main.ntotal) + self._dn - len(self._gone)
            return self._dn >= self.merge_rows or len(self._gone) > self.hidden_share * max(live, 1)

    def _merge_while_due(self) -> None:
        try:
            while self._due():
                self.merge()
        except Exception:  # the index stays as it was (delta and removed set intact); the next write tries again
            log.exception("index merge failed")

    def wait_merged(self, timeout: Optional[float] = None) -> None:
        """Until the merger thread (if any) has finished (tests; store.close)."""
        merger = self._merger
        if merger is not None:
            merger.join(timeout)

    def merge(self) -> bool:
        """Fold the delta and the removals into a new main index and swap it in; False: nothing to fold."""
        with self._merge_lock:  # one merge at a time; writes and searches go on meanwhile
            with self._state:
                main, n = self._main, self._dn
                dx, dids, gone = self._dx[:n], self._dids[:n], self._gone  # rows below _dn never change
            if not n and not gone:
                return False
            t0 = time.perf_counter()
            new, dropped = self._merged(main, dx, dids, gone)
            with self._state:
                rest = self._dn - n  # enrolled while merging: they stay in the delta, over the new main
                room = max(64, 2 * rest)
                dx2, ids2 = np.zeros((room, self.dim), np.float32), np.zeros(room, np.int64)
                dx2[:rest], ids2[:rest] = self._dx[n:self._dn], self._dids[n:self._dn]
                self._main, self._dx, self._dids, self._dn = new, dx2, ids2, rest
                self._gone = self._gone - dropped  # removed while merging: still hidden
            self.merges += 1
            log.info("index: merged %d new and %d removed faces into %s of %d in %.1f s", n, len(dropped), self.kind,
                     new.ntotal, time.perf_counter() - t0)
            return True

    def _merged(self, main, dx: np.ndarray, dids: np.ndarray, gone: frozenset):
        """(a new main index: ``main`` + the delta's faces - ``gone``, the ids it no longer holds)."""
        faiss = _faiss()
        gone_ids = np.fromiter(gone, np.int64, len(gone))
        keep = ~np.isin(dids, gone_ids)
        if self.kind == "hnsw" and len(gone) > self.hidden_share * max(int(main.ntotal) + len(dids) - len(gone), 1):
            return self._rebuilt_hnsw(main, dx[keep], dids[keep], gone_ids), set(gone)
        new = faiss.clone_index(main)
        if self.kind == "flat":  # one allocation for the vectors added (std::vector would double its capacity)
            codes = faiss.downcast_index(new.index).codes
            used = codes.size()
            codes.resize(used + int(keep.sum()) * self.dim * 4)
            codes.resize(used)
        if keep.any():
            new.add_with_ids(np.ascontiguousarray(dx[keep]), np.ascontiguousarray(dids[keep]))
        if self.kind == "hnsw":  # only the delta's removed faces leave (never added); main's stay hidden
            return new, set(dids[~keep].tolist())
        if len(gone_ids):
            new.remove_ids(gone_ids)
        return new, set(gone)

    def _rebuilt_hnsw(self, main, dx: np.ndarray, dids: np.ndarray, gone_ids: np.ndarray):
        """A new graph over main's faces not in ``gone_ids`` and the delta's (HNSW cannot remove)."""
        faiss = _faiss()
        storage = faiss.downcast_index(faiss.downcast_index(main.index).storage)
        total = int(main.ntotal)
        x = faiss.rev_swig_ptr(storage.get_xb(), total * self.dim).reshape(total, self.dim)
        ids = faiss.vector_to_array(main.id_map)
        keep = ~np.isin(ids, gone_ids)
        new = self._empty_hnsw()
        set_search_knob(new, "hnsw", search_knob(main, "hnsw"))
        new.add_with_ids(np.ascontiguousarray(np.concatenate([x[keep], dx])), np.concatenate([ids[keep], dids]))
        return new


def _ids_of(index) -> np.ndarray:
    """The ids a FAISS index holds (IndexIDMap: its map; IVF: its inverted lists)."""
    faiss = _faiss()
    index = faiss.downcast_index(index)
    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    lists = index.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(c), lists.list_size(c)).copy() for c in range(index.nlist)
             if lists.list_size(c)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _exact(q: np.ndarray, x: np.ndarray, ids: np.ndarray, k: int, gone: frozenset) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the delta by inner product (numpy), removed ids left out: (scores Q x k', ids Q x k')."""
    s = q @ x.T
    if gone:
        s[:, np.isin(ids, np.fromiter(gone, np.int64, len(gone)))] = -np.inf
    k = min(k, len(ids))
    top = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < len(ids) else np.broadcast_to(np.arange(len(ids)), s.shape)
    scores = np.take_along_axis(s, top, 1)
    return scores, np.where(np.isfinite(scores), ids[top], -1)


def _face_recall(index, vectors: np.ndarray, ids: np.ndarray) -> float:
    """Recall@1 of ``index`` (which returns face ids) over its own faces, held out one at a time (face level: the
    service's index knows no identities)."""
    order = np.argsort(ids, kind="stable")

    def rows(q: np.ndarray, k: int) -> np.ndarray:
        found = index.search(q, k)[1]
        at = order[np.clip(np.searchsorted(ids, found, sorter=order), 0, len(ids) - 1)]
        return np.where((found >= 0) & (ids[at] == found), at, -1)

    return held_out_recall(rows, vectors, sample=RECALL_QUERIES)
