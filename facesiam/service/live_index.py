"""The service's in-memory search index, keyed by face id: a write never waits for a search, and folding writes
in costs what was written, not the size of the gallery.

Three parts, all keyed by face id:

    parts     FAISS indexes that nothing changes while searches can see them: the base, built at start, and the
              tails, one per merge since (flat: IndexIDMap(IndexFlatIP); ivf: IndexIVFFlat with the face ids as its
              own ids, cells trained once at start from the database, at least 39 faces a cell, every part on the
              same cells; hnsw: IndexIDMap2(IndexHNSWFlat)); nprobe / efSearch tuned on the base to a recall@1
              target as facesiam gallery build does (eval/gallery.py: tune_search), the same knob on every part
    delta     the faces enrolled since the last merge, searched exactly (numpy); append-only arrays
    removed   the face ids deleted but still held by a part, filtered out of every part (a FAISS IDSelector)

A write appends to the delta or adds to the removed set under a lock held for microseconds; a search takes
references to the three under the same lock and searches them without it (FAISS releases the GIL, so searches also
run side by side). A merger thread, off the request path and at a lower CPU priority than the requests (Linux),
turns the delta into a new tail when it passes ``merge_rows`` faces. Past ``MAX_TAILS`` tails it folds them into
one, or, once the tails hold more than ``TAIL_SHARE`` of the base, everything into a new base; so does it when the
removed faces pass ``hidden_share`` of the index (HNSW cannot remove: its new base is a graph built anew from the
faces left). Every fold builds new indexes and swaps them in: writes that arrive meanwhile stay in the delta and
the removed set over the new parts; none is lost, none comes back.

Why copy-on-write and not a reader-writer lock over one index changed in place: at 200k 512-d faces on 2 cores a
single search of the flat index took ~100 ms, so any scheme in which a write (or a merge in place) needs the index
to itself waits for the searches in flight, and makes the searches queued behind it wait too (issue 40: 360 ms
p99 through `serve`; in-process, the old single lock starved the writer for seconds: docs/benchmarks.md). Why
tails and not one index copied at every merge: the copy of a 200k-face index cost 1.4 s of memory traffic (6 s on
2 busy cores) once per ``merge_rows`` enrolments, on the cores the searches need; a tail costs the delta's size.
The full fold still copies the gallery, once per ~``TAIL_SHARE`` of its size in enrolments (every 64k faces at
200k: 16x rarer). The delta's exact search is a (queries x delta) product, well under a millisecond at 4,096 faces;
each tail adds one FAISS search of at most a few 10k faces.

Search results are face ids; the gallery store (service/store.py) maps them to identities.
"""

from __future__ import annotations

import logging
import os
import sys
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
HIDDEN_SHARE = 0.1  # removed faces, as a share of the index, that start a full fold (HNSW: a new graph)
MAX_TAILS = 8  # tails past which they are folded: into one tail, or with the base (TAIL_SHARE)
TAIL_SHARE = 0.25  # the tails' faces, as a share of the base's, past which a fold of the tails takes the base too
MERGE_NICENESS = 10  # the merger thread's: a fold takes the cores the requests leave (Linux, per thread)
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
        vectors = np.zeros((0, dim), np.float32) if vectors is None else np.ascontiguousarray(vectors, np.float32)
        ids = np.zeros(0, np.int64) if ids is None else np.ascontiguousarray(ids, np.int64)
        self.dim, self.hnsw_m, self.merge_rows, self.hidden_share = dim, hnsw_m, merge_rows, hidden_share
        self.note = ""
        t0 = time.perf_counter()
        if kind == "ivf" and len(vectors) < MIN_TRAIN_PER_CELL * 2:
            self.note = (f"ivf needs at least {MIN_TRAIN_PER_CELL * 2} faces to train its cells; "
                         f"searching exactly (flat) until a restart finds enough")
            kind = "flat"
        self.kind = kind
        # the cells every ivf part shares (an empty, trained index: a part is a copy of it, filled)
        self._cells = trained_ivf(vectors, default_nlist(len(vectors))) if kind == "ivf" else None
        self._knob: Optional[int] = None  # nprobe / efSearch of every part, once tuned on the base
        base = self._part(vectors, ids)
        self.recall = 1.0
        if kind != "flat":
            self._knob, self.recall = tune_search(base, kind, nprobe if kind == "ivf" else ef_search, target_recall,
                                                  lambda: _face_recall(base, vectors, ids))
        # what a search reads, swapped whole under _state (never changed in place once a search can see it)
        self._state = threading.Lock()
        self._parts: tuple = (base,)
        self._dx, self._dids, self._dn = np.zeros((64, dim), np.float32), np.zeros(64, np.int64), 0
        self._gone: frozenset[int] = frozenset()
        self._selector: tuple = (frozenset(), None)  # (the removed set it excludes, the FAISS selector)
        self._merge_lock, self._merger = threading.Lock(), None
        self.merges = self.folds = 0
        log.info("index: %s over %d faces in %.1f s%s", kind, len(ids), time.perf_counter() - t0,
                 f" ({self.describe()})" if kind != "flat" else "")

    def _part(self, vectors: np.ndarray, ids: np.ndarray):
        """A new index of this kind holding ``vectors`` under ``ids`` (with the base's cells and search knob)."""
        faiss = _faiss()
        if self.kind == "ivf":
            part = faiss.clone_index(self._cells)
        elif self.kind == "flat":
            part = faiss.IndexIDMap(faiss.IndexFlatIP(self.dim))
        else:
            base = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efConstruction = EF_CONSTRUCTION
            part = faiss.IndexIDMap2(base)
        if self._knob is not None:
            set_search_knob(part, self.kind, self._knob)
        if len(ids):
            part.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64))
        return part

    @property
    def size(self) -> int:
        with self._state:
            return sum(int(p.ntotal) for p in self._parts) + self._dn - len(self._gone)

    @property
    def pending(self) -> tuple[int, int]:
        """(faces in the delta, removed faces still held): what the next merge folds in."""
        with self._state:
            return self._dn, len(self._gone)

    @property
    def tails(self) -> int:
        """Parts made by merges since the last full fold."""
        return len(self._parts) - 1

    def face_ids(self) -> np.ndarray:
        """Every face id a search can return now, sorted (for checks: O(N))."""
        with self._state:
            parts, dids, gone = self._parts, self._dids[:self._dn].copy(), self._gone
        ids = np.concatenate([*(_ids_of(p) for p in parts), dids])
        return np.sort(ids[~np.isin(ids, np.fromiter(gone, np.int64, len(gone)))])

    def describe(self) -> str:
        base = self._parts[0]
        value = search_knob(base, self.kind)
        knob = (f"nlist {_faiss().extract_index_ivf(base).nlist}, nprobe {value}" if self.kind == "ivf" else
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
            parts, dx, dids, gone = self._parts, self._dx[:self._dn], self._dids[:self._dn], self._gone
        total = sum(int(p.ntotal) for p in parts) + len(dids)
        k = int(min(k, total))
        if total == 0 or k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        found = [self._search_part(p, q, min(k, int(p.ntotal)), gone) for p in parts]
        if len(dids):
            found.append(_exact(q, dx, dids, k, gone))
        if len(found) == 1:
            scores, ids = found[0]
        else:
            scores, ids = np.concatenate([s for s, _ in found], 1), np.concatenate([i for _, i in found], 1)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def _search_part(self, part, q: np.ndarray, k: int, gone: frozenset) -> tuple[np.ndarray, np.ndarray]:
        if k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if not gone:
            return part.search(q, k)
        faiss = _faiss()
        selector = self._excluding(gone)
        # parameters per call: IndexIDMap swaps its selector in and out of them during a search
        if self.kind == "ivf":
            params = faiss.SearchParametersIVF(sel=selector[1], nprobe=search_knob(part, "ivf"))
        elif self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=selector[1], efSearch=search_knob(part, "hnsw"))
        else:
            params = faiss.SearchParameters(sel=selector[1])
        # faiss.contrib.torch_utils (imported by pytorch-metric-learning's utils.inference) replaces every Index.search
        # with one that takes no ``params``; faiss keeps the original as search_numpy.
        return getattr(part, "search_numpy", part.search)(q, k, params=params)

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
            return self._dn >= self.merge_rows or self._hidden_past_share(self._parts, self._dn, self._gone)

    def _hidden_past_share(self, parts: tuple, delta: int, gone: frozenset) -> bool:
        live = sum(int(p.ntotal) for p in parts) + delta - len(gone)
        return len(gone) > self.hidden_share * max(live, 1)

    def _merge_while_due(self) -> None:
        _lower_priority()
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

    def merge(self, full: bool = False) -> bool:
        """Turn the delta into a new tail, folding parts as the module's docstring says (``full``: everything into
        one new base, the removed faces left out where the kind can); False: nothing to do."""
        with self._merge_lock:  # one merge at a time; writes and searches go on meanwhile
            with self._state:
                parts, n = self._parts, self._dn
                dx, dids, gone = self._dx[:n], self._dids[:n], self._gone  # rows below _dn never change
            fold_due = (full and (len(parts) > 1 or gone)) or (gone and self._hidden_past_share(parts, 0, gone))
            if not n and not fold_due:
                return False
            t0 = time.perf_counter()
            gone_ids = np.fromiter(gone, np.int64, len(gone))
            keep = ~np.isin(dids, gone_ids)
            new = parts + ((self._part(dx[keep], dids[keep]),) if keep.any() else ())
            rebuild = self._hidden_past_share(new, 0, gone)
            tail_rows = sum(int(p.ntotal) for p in new[1:])
            folded = ""
            if full or rebuild or (len(new) - 1 > MAX_TAILS and tail_rows > TAIL_SHARE * int(new[0].ntotal)):
                new, folded = (self._folded(new, gone_ids, rebuild or full),), "everything"
            elif len(new) - 1 > MAX_TAILS:
                new, folded = (new[0], self._folded(new[1:], gone_ids, True)), "the tails"
            # removed ids that no part holds any more leave the set (HNSW keeps its base's until a rebuild)
            held = np.concatenate([_ids_of(p) for p in new]) if folded else dids[keep]
            dropped = set(dids[~keep].tolist()) | ({int(i) for i in gone_ids[~np.isin(gone_ids, held)]}
                                                   if folded else set())
            with self._state:
                rest = self._dn - n  # enrolled while merging: they stay in the delta, over the new parts
                room = max(64, 2 * rest)
                dx2, ids2 = np.zeros((room, self.dim), np.float32), np.zeros(room, np.int64)
                dx2[:rest], ids2[:rest] = self._dx[n:self._dn], self._dids[n:self._dn]
                self._parts, self._dx, self._dids, self._dn = new, dx2, ids2, rest
                self._gone = self._gone - dropped  # removed while merging: still hidden
            self.merges += 1
            self.folds += folded == "everything"
            log.info("index: merged %d new and %d removed faces into %s (%d parts, %d faces%s) in %.2f s", n,
                     len(dropped), self.kind, len(new), sum(int(p.ntotal) for p in new),
                     f"; folded {folded}" if folded else "", time.perf_counter() - t0)
            return True

    def _folded(self, parts: tuple, gone_ids: np.ndarray, remove: bool):
        """One new index holding every face of ``parts`` except ``gone_ids``: a copy of the first part with the
        others' faces added (IVF: their lists joined, no face assigned to a cell again); HNSW, which cannot remove,
        keeps the first part's removed faces (hidden) unless ``remove`` is set, which builds a new graph."""
        faiss = _faiss()
        if self.kind == "hnsw" and remove:
            x, ids = np.concatenate([_vectors_of(p) for p in parts]), np.concatenate([_ids_of(p) for p in parts])
            keep = ~np.isin(ids, gone_ids)
            return self._part(x[keep], ids[keep])
        out = faiss.clone_index(parts[0])
        if self.kind == "ivf":
            for part in parts[1:]:
                out.merge_from(faiss.clone_index(part), 0)  # merge_from empties its argument: a copy
        elif len(parts) > 1:
            x = np.concatenate([_vectors_of(p) for p in parts[1:]])
            ids = np.concatenate([_ids_of(p) for p in parts[1:]])
            keep = ~np.isin(ids, gone_ids)
            if self.kind == "flat":  # one allocation for the rows added (std::vector would double its capacity)
                codes = faiss.downcast_index(out.index).codes
                used = codes.size()
                codes.resize(used + int(keep.sum()) * self.dim * 4)
                codes.resize(used)
            if keep.any():
                out.add_with_ids(np.ascontiguousarray(x[keep]), np.ascontiguousarray(ids[keep]))
        if self.kind != "hnsw" and len(gone_ids):
            out.remove_ids(faiss.IDSelectorBatch(gone_ids))
        return out


def _lower_priority() -> None:
    """Lower the calling thread's CPU priority (Linux: a thread's niceness is its own; elsewhere the call would
    lower the whole process, so nothing is done)."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                           os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + MERGE_NICENESS)
        except OSError:  # not allowed here: the merge runs at the requests' priority
            pass


def _vectors_of(index) -> np.ndarray:
    """The vectors a flat or HNSW part stores, in its id map's order (a copy)."""
    faiss = _faiss()
    inner = faiss.downcast_index(faiss.downcast_index(index).index)
    storage = faiss.downcast_index(inner.storage) if hasattr(inner, "storage") else inner
    n, d = int(index.ntotal), int(index.d)
    return faiss.rev_swig_ptr(storage.get_xb(), n * d).reshape(n, d).copy() if n else np.zeros((0, d), np.float32)


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
