"""A persistent face gallery: FAISS index + identity table; build, add, search (top-k identities with scores).

    facesiam gallery build --embeddings gallery.npz --out GALLERY [--kind flat|ivf|hnsw]
    facesiam gallery build --checkpoint RUN/best --data DIR --out GALLERY
    facesiam gallery add --index GALLERY --embeddings more.npz          (or --checkpoint + --data)
    facesiam gallery search --index GALLERY --checkpoint RUN/best --image IMG [IMG ...] -k 5
    facesiam gallery search --index GALLERY --embeddings probes.npz -k 5 --out results.json
    facesiam gallery info --index GALLERY

A gallery directory holds ``index.faiss`` (vectors; FAISS inner product = cosine on unit vectors),
``entries.npz`` (identity and source path of each entry, identity names) and ``gallery.json`` (kind, parameters,
recall estimate, model). ``flat`` is exact; ``ivf`` and ``hnsw`` are approximate and their search parameter
(nprobe / efSearch) is tuned at build time until the recall@1 estimate reaches ``--target-recall``, which is
stored and printed. Exact search over a flat index runs as blocked matmul + top-k in torch (on CPU this beat
FAISS's IndexFlatIP by 2.5x here; on CUDA torch or FAISS-GPU); FAISS holds the persistent, approximate and GPU
indexes. A gallery is rewritten whole into a temporary directory and swapped in, so a failed add loses nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..device import resolve_device
from ..errors import InputError
from ..fileio import recover_directory, staged_directory, write_json
from ._tensors import Array, normalize, progress_bar

log = logging.getLogger("facesiam.gallery")

INDEX_FILE, ENTRIES_FILE, META_FILE = "index.faiss", "entries.npz", "gallery.json"
KINDS = ("flat", "ivf", "hnsw")
DEFAULT_TARGET_RECALL = 0.99
RECALL_SAMPLE = 1000


def _faiss():
    import faiss

    return faiss


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32, C-contiguous): cosine = inner product."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise InputError(f"embeddings must be an N x D matrix, got shape {x.shape}")
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


def default_nlist(n: int) -> int:
    """IVF cells for ``n`` entries: ~4 sqrt(N) (a power of two), >= 39 training points each as FAISS asks; with 10
    k-means iterations on 40 points per cell the cells need only be reasonable (tools/bench_eval.py: 1M entries,
    4096 cells, nprobe 8 -> recall@1 0.99 at 14x the speed of exact search)."""
    return int(max(1, min(2 ** round(math.log2(4 * math.sqrt(max(n, 1)))), n // 39)))


def trained_ivf(x: np.ndarray, nlist: int):
    """An empty faiss.IndexIVFFlat (inner product) whose ``nlist`` cells are trained on unit rows ``x``: 10 k-means
    iterations on at most 40 points a cell (a seeded sample), which is all the cells need (see default_nlist)."""
    faiss = _faiss()
    n, d = x.shape
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    index.train(x if n <= 40 * nlist else x[np.random.default_rng(0).choice(n, 40 * nlist, replace=False)])
    return index


def search_knob(index, kind: str) -> Optional[int]:
    """An index's search knob: nprobe (ivf), efSearch (hnsw), None (flat); under an IndexIDMap too."""
    if kind == "ivf":
        return int(_faiss().extract_index_ivf(index).nprobe)
    if kind == "hnsw":
        return int(_hnsw(index).efSearch)
    return None


def set_search_knob(index, kind: str, value: int) -> None:
    if kind == "ivf":
        _faiss().extract_index_ivf(index).nprobe = int(value)
    elif kind == "hnsw":
        _hnsw(index).efSearch = int(value)


def _hnsw(index):
    """The HNSW graph's parameters of an IndexHNSW, or of one under an IndexIDMap(2)."""
    faiss = _faiss()
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index).hnsw if hasattr(index, "id_map") else index.hnsw


def tune_search(index, kind: str, given: Optional[int], target: float,
                recall: Callable[[], float]) -> tuple[int, float]:
    """The search knob for an ivf/hnsw index (nprobe/efSearch), shared by ``facesiam gallery build`` and the
    service's index (service/live_index.py): ``given`` when set, else the smallest power of two (hnsw: from 16)
    whose ``recall()`` estimate reaches ``target``. Leaves the index set to it; returns (value, recall)."""
    limit = _faiss().extract_index_ivf(index).nlist if kind == "ivf" else 4096
    lowest = 1 if kind == "ivf" else 16
    candidates = [given] if given else [v for v in (2 ** p for p in range(13)) if lowest <= v < limit] + [limit]
    value, estimate = candidates[0], 0.0
    for value in candidates:
        set_search_knob(index, kind, value)
        estimate = recall()
        if estimate >= target:
            break
    return int(value), estimate


def held_out_recall(search: Callable[[np.ndarray, int], np.ndarray], vectors: np.ndarray,
                    labels: Optional[np.ndarray] = None, sample: int = RECALL_SAMPLE, seed: int = 0) -> float:
    """Recall@1 against exact search, up to ``sample`` of the unit rows ``vectors`` as queries that leave
    themselves out: the share whose first other result has the label of the exact nearest other row.
    ``search(q, k)`` returns row numbers of ``vectors`` (Q x k, -1: none); ``labels``: identities (None: each row
    its own, i.e. the same face)."""
    n = len(vectors)
    if n < 2:
        return 1.0
    labels = np.arange(n) if labels is None else np.asarray(labels)
    pick = np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))
    q = np.ascontiguousarray(vectors[pick])
    _, exact = topk_cosine(q, vectors, 1, exclude=pick, device="cpu", normalized=True)
    approx = search(q, 2)
    first_other = np.where(approx[:, 0] == pick, approx[:, 1], approx[:, 0])
    found = first_other >= 0
    return float(np.mean(found & (labels[np.maximum(first_other, 0)] == labels[exact[:, 0]])))


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
    with torch.inference_mode(), progress_bar(nq, "search", progress, unit="query") as bar:
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


class Gallery:
    """Entries (unit vectors) with an identity name and a source path each; search returns identities."""

    def __init__(self, index, names: list[str], identity: np.ndarray, paths: list[str], meta: dict):
        self.index = index
        self.names = names
        self.identity = np.asarray(identity, dtype=np.int64)
        self.paths = paths
        self.meta = meta
        self._name_id = {n: i for i, n in enumerate(names)}

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, embeddings: np.ndarray, identities: Sequence[str], paths: Optional[Sequence[str]] = None, *,
              kind: str = "flat", nlist: Optional[int] = None, nprobe: Optional[int] = None, hnsw_m: int = 32,
              ef_construction: int = 80, ef_search: Optional[int] = None,
              target_recall: float = DEFAULT_TARGET_RECALL, meta: Optional[dict] = None) -> "Gallery":
        """A new gallery. For ivf/hnsw, nprobe/ef_search default to the smallest value whose recall@1 estimate
        reaches ``target_recall`` (see ``estimate_recall``)."""
        faiss = _faiss()
        x = unit_rows(embeddings)
        n, d = x.shape
        if n == 0:
            raise InputError("cannot build a gallery from 0 embeddings")
        if kind not in KINDS:
            raise InputError(f"unknown gallery kind {kind!r}: use one of {KINDS}")
        params: dict = {}
        t0 = time.time()
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "ivf":
            nlist = int(nlist or default_nlist(n))
            index = trained_ivf(x, nlist)
            params["nlist"] = nlist
        else:
            index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            params.update(M=hnsw_m, efConstruction=ef_construction)
        index.add(x)
        build_s = time.time() - t0
        names, identity = _intern([], {}, identities)
        info = {"kind": kind, "dim": d, "params": params, "created": _now(), "build_seconds": round(build_s, 2),
                **(meta or {})}
        gallery = cls(index, names, identity, list(paths) if paths is not None else [""] * n, info)
        if kind != "flat":
            gallery.meta["recall_target"] = target_recall
            gallery._tune(x, nprobe if kind == "ivf" else ef_search, target_recall)
        else:
            gallery.meta["recall_at_1_estimate"] = 1.0
        log.info("built %s gallery: %d entries of %d identities, dim %d, in %.1fs%s", kind, n, len(names), d,
                 build_s, "" if kind == "flat" else f" ({gallery.recall_note()})")
        return gallery

    def _set_knob(self, value: int) -> None:
        if self.kind in ("ivf", "hnsw"):
            set_search_knob(self.index, self.kind, value)
            self.meta["params"]["nprobe" if self.kind == "ivf" else "efSearch"] = int(value)

    def _tune(self, x: np.ndarray, given: Optional[int], target: float) -> None:
        """Use the given knob value, else the smallest power of two reaching the target recall estimate."""
        value, recall = tune_search(self.index, self.kind, given, target, lambda: self.estimate_recall(x))
        self._set_knob(value)  # records it in meta too
        self.meta["recall_at_1_estimate"] = recall

    def recall_note(self) -> str:
        p = self.meta.get("params", {})
        knob = f"nprobe {p.get('nprobe')}" if self.kind == "ivf" else f"efSearch {p.get('efSearch')}"
        return f"{knob}: estimated recall@1 {self.meta.get('recall_at_1_estimate', float('nan')):.4f}"

    def estimate_recall(self, x: Optional[np.ndarray] = None, sample: int = RECALL_SAMPLE, seed: int = 0, *,
                        queries: Optional[np.ndarray] = None) -> float:
        """Recall@1 of this index against exact search: the share of queries whose top-1 identity is the one
        exact search returns (what ``search`` reports; among near-identical images of one person, which image
        comes first does not matter).

        With ``queries`` (real probes) those are used. Without, up to ``sample`` gallery entries are the queries
        and leave themselves out (their nearest *other* entry is usually another image of the same person); that
        is what build-time tuning uses. Probes much farther from the gallery than its images are from each other
        can see a lower recall.
        """
        vectors = self.vectors() if x is None else x
        if queries is not None:
            q = unit_rows(queries)
            _, exact = topk_cosine(q, vectors, 1, device="cpu", normalized=True)
            _, approx = self.index.search(q, 1)
            return float(np.mean(self.identity[approx[:, 0]] == self.identity[exact[:, 0]]))
        return held_out_recall(lambda q, k: self.index.search(q, k)[1], vectors, self.identity, sample, seed)

    # ------------------------------------------------------------------ adding and searching
    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def vectors(self) -> np.ndarray:
        """All entries as an (n, d) float32 array (a view for flat indexes, a copy otherwise)."""
        faiss = _faiss()
        if self.kind == "flat":
            return faiss.rev_swig_ptr(self.index.get_xb(), self.size * self.index.d).reshape(self.size, self.index.d)
        if self.kind == "hnsw":
            return faiss.rev_swig_ptr(faiss.downcast_index(self.index.storage).get_xb(),
                                      self.size * self.index.d).reshape(self.size, self.index.d)
        self.index.make_direct_map()
        return self.index.reconstruct_n(0, self.size)

    def add(self, embeddings: np.ndarray, identities: Sequence[str], paths: Optional[Sequence[str]] = None) -> None:
        """Append entries (IVF keeps the centroids it was trained with; rebuild if the data shift a lot)."""
        x = unit_rows(embeddings)
        if x.shape[1] != self.index.d:
            raise InputError(f"embeddings have dimension {x.shape[1]}, the gallery {self.index.d}: use the model "
                             f"the gallery was built with ({self.meta.get('checkpoint', 'see gallery.json')})")
        if len(identities) != len(x):
            raise InputError(f"{len(x)} embeddings but {len(identities)} identities")
        self.index.add(x)
        self.names, new = _intern(self.names, self._name_id, identities)
        self.identity = np.r_[self.identity, new]
        self.paths += list(paths) if paths is not None else [""] * len(x)
        self.meta["updated"] = _now()

    def copy(self) -> "Gallery":
        """An independent copy (index included): change it while searches go on using this one."""
        return Gallery(_faiss().clone_index(self.index), list(self.names), self.identity.copy(), list(self.paths),
                       json.loads(json.dumps(self.meta)))

    def remove(self, identity: str) -> int:
        """Drop every entry of ``identity``; returns how many there were (0: not enrolled, nothing changes)."""
        ident = self._name_id.get(str(identity))
        keep = self.identity != ident if ident is not None else None
        if keep is None or keep.all():
            return 0
        faiss = _faiss()
        removed = int((~keep).sum())
        # a fresh index over the kept vectors, so entry numbers stay positions in the tables (FAISS's remove_ids
        # would keep the old numbers); IVF keeps its trained cells, HNSW (which cannot remove) its parameters
        x = np.ascontiguousarray(self.vectors()[keep])
        if self.kind == "flat":
            index = faiss.IndexFlatIP(self.index.d)
        elif self.kind == "ivf":
            index = faiss.clone_index(self.index)
            index.reset()
            index.nprobe = self.index.nprobe
        else:
            index = faiss.IndexHNSWFlat(self.index.d, self.meta["params"]["M"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.meta["params"]["efConstruction"]
            index.hnsw.efSearch = self.index.hnsw.efSearch
        index.add(x)
        self.index = index
        # identity numbers stay dense: the names of the identities left, in their old order
        left = [n for i, n in enumerate(self.names) if i != ident]
        remap = np.array([j - (j > ident) for j in range(len(self.names))], dtype=np.int64)
        self.identity = remap[self.identity[keep]]
        self.paths = [p for p, k in zip(self.paths, keep) if k]
        self.names = left
        self._name_id = {n: i for i, n in enumerate(left)}
        self.meta["updated"] = _now()
        return removed

    def search_entries(self, queries: np.ndarray, k: int, *, device: Optional[str] = None,
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-k entries per query: (scores Q x k, entry indices Q x k; -1 where fewer exist)."""
        faiss = _faiss()
        q = unit_rows(queries)
        k = int(min(k, self.size))
        if self.kind == "flat":
            if faiss.get_num_gpus() > 0:
                gpu = faiss.index_cpu_to_all_gpus(self.index)
                return gpu.search(q, k)
            return topk_cosine(q, self.vectors(), k, device=device, normalized=True,
                               progress=progress)
        return self.index.search(q, k)

    def search(self, queries: np.ndarray, k: int = 5, *, device: Optional[str] = None,
               progress: bool = False) -> list[list[dict]]:
        """Top-k identities per query: [{"identity", "score", "path"}], an identity's score = its best entry's."""
        per_identity = np.bincount(self.identity, minlength=len(self.names)).max() if self.size else 1
        k_entries = int(min(self.size, max(k, (k - 1) * per_identity + 1)))
        scores, entries = self.search_entries(queries, k_entries, device=device, progress=progress)
        results = []
        for row_s, row_e in zip(scores, entries):
            seen, hits = set(), []
            for s, e in zip(row_s, row_e):
                if e < 0:
                    continue
                ident = int(self.identity[e])
                if ident in seen:
                    continue
                seen.add(ident)
                hits.append({"identity": self.names[ident], "score": float(s), "path": self.paths[e]})
                if len(hits) == k:
                    break
            results.append(hits)
        return results

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write the gallery into a temporary directory, then swap it in for ``directory``."""
        faiss = _faiss()
        directory = Path(directory)
        if directory.exists() and not overwrite:
            raise FileExistsError(f"{directory} exists; pass --overwrite to replace it, or use 'gallery add'")
        with staged_directory(directory, last=META_FILE) as tmp:
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            with open(tmp / ENTRIES_FILE, "wb") as f:
                np.savez(f, identity=self.identity, names=np.asarray(self.names, dtype=str),
                         paths=np.asarray(self.paths, dtype=str))
            meta = {**self.meta, "size": self.size, "identities": len(self.names)}
            write_json(tmp / META_FILE, meta)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Gallery":
        faiss = _faiss()
        directory = Path(directory)
        if recover_directory(directory, marker=META_FILE):  # a save cut short between its two renames
            log.warning("%s: restored the gallery as it was before an interrupted save", directory)
        missing = [f for f in (INDEX_FILE, ENTRIES_FILE, META_FILE) if not (directory / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory} is not a gallery (missing {', '.join(missing)}); "
                                    f"make one with tools/gallery.py build --out {directory}")
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        index = faiss.read_index(str(directory / INDEX_FILE))
        with np.load(directory / ENTRIES_FILE, allow_pickle=False) as z:
            identity, names, paths = z["identity"], z["names"].tolist(), z["paths"].tolist()
        if index.ntotal != len(identity):
            raise InputError(f"{directory}: index holds {index.ntotal} vectors but the table {len(identity)} entries")
        gallery = cls(index, names, identity, paths, meta)
        for key in ("nprobe", "efSearch"):
            if key in meta.get("params", {}):
                gallery._set_knob(meta["params"][key])
        return gallery


def _intern(names: list[str], lookup: dict, identities: Sequence[str]) -> tuple[list[str], np.ndarray]:
    names = list(names)
    ids = np.empty(len(identities), dtype=np.int64)
    for i, name in enumerate(identities):
        name = str(name)
        if name not in lookup:
            lookup[name] = len(names)
            names.append(name)
        ids[i] = lookup[name]
    return names, ids


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
