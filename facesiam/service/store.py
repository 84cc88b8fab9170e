"""The service's gallery: a database (service/database.py) that holds it, and an index in memory (live_index.py)
that follows the database's change log.

The store owns the order of things: the routes and the service talk to the store only, and the store alone calls
its two parts, one way (store -> database, store -> index; neither knows the other, and the database's
listener only wakes the store with the callback it was given). Every
write is one database transaction (acknowledged only once committed); the store then applies the log since the
last change it saw (``catch_up``), which is how other processes' writes arrive too (PostgreSQL: at once, by
LISTEN/NOTIFY). Nothing is rewritten whole: an enrol costs one insert per face and one add to the index's delta,
which never waits for the searches in flight (live_index.py).

    gallery folder   GALLERY/gallery.sqlite (created 0600 in a 0700 folder); a folder of the earlier format
                     (gallery.json + index.faiss + entries.npz, facesiam gallery build) is imported on first start
    --db URL         postgresql://user@host/db: several service processes share the gallery
    neither          an in-memory SQLite database (gone when the service stops)
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import ConflictError, InputError
from ..eval.gallery import ENTRIES_FILE, INDEX_FILE, META_FILE, Gallery, unit_rows
from ..fileio import recover_directory
from .database import SQLITE_FILE, DatabaseUnavailable, FaceDatabase, open_database
from .hardening import identity_key
from .live_index import LiveIndex

log = logging.getLogger("facesiam.serve")

SERVICE_SOURCE = "enrolled"


class GalleryStore:
    """Enrolled identities and faces: writes go to ``db``; searches use the index in memory."""

    def __init__(self, db: FaceDatabase, *, model: str = "", index: str = "flat", nprobe: Optional[int] = None,
                 ef_search: Optional[int] = None):
        self._db, self.model, self.dim = db, model, db.dim
        snap = db.snapshot()
        self._index = LiveIndex(self.dim, index, vectors=unit_rows(snap.embeddings), ids=snap.face_ids, nprobe=nprobe,
                                ef_search=ef_search)
        self._apply = threading.Lock()
        self.seq = snap.seq
        self.names: dict[int, str] = dict(snap.names)  # identity id -> name
        self.by_name: dict[str, int] = {n: i for i, n in self.names.items()}
        self.by_key: dict[str, int] = {identity_key(n): i for i, n in self.names.items()}  # look-alikes (hardening)
        self.face_identity: dict[int, int] = dict(zip(snap.face_ids.tolist(), snap.identity_ids.tolist()))
        ids, counts = np.unique(snap.identity_ids, return_counts=True)
        self.counts: dict[int, int] = dict(zip(ids.tolist(), counts.tolist()))
        # an upper bound on faces per identity (searches fetch enough faces to fill k identities); it only grows
        # between starts: recomputing it on every delete would cost a pass over every identity
        self.most_faces = int(counts.max()) if len(counts) else 1
        self._stop, self._listener = threading.Event(), None

    # ------------------------------------------------------------------ following the database
    def follow(self) -> None:
        """Apply other processes' writes as they happen (PostgreSQL; a SQLite file has one writer: this one)."""
        self._listener = self._db.listen(self.catch_up, self._stop)

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=5)
        self._index.wait_merged(timeout=5)  # a merge is memory only: the database holds every write already
        self._db.close()

    # ------------------------------------------------------------------ the parts, as the service sees them
    def ping(self) -> bool:
        """Whether the database answers now (reconnecting if it went away)."""
        return self._db.ping()

    def describe_database(self) -> str:
        return self._db.describe()

    def describe_index(self) -> str:
        return self._index.describe()

    @property
    def index_kind(self) -> str:
        return self._index.kind

    @property
    def index_ready(self) -> bool:
        return self._index is not None

    def on_statement(self, observe: Callable[[float], None]) -> None:
        """``observe(seconds)`` after each database statement (/metrics)."""
        self._db.on_statement = observe

    def catch_up(self) -> int:
        """Apply the change log since the last change seen; returns how many changes were applied."""
        with self._apply:
            changes = self._db.changes_since(self.seq)
            pending_ids: list[int] = []
            pending_x: list[np.ndarray] = []

            def flush():
                if pending_ids:
                    self._index.add(np.asarray(pending_ids, np.int64), unit_rows(np.stack(pending_x)))
                    pending_ids.clear()
                    pending_x.clear()

            for change in changes:
                ident = change.identity_id
                if change.name is not None:
                    self._name(ident, change.name)
                if change.op == "add" and change.embedding is not None and change.face_id not in self.face_identity:
                    pending_ids.append(change.face_id)
                    pending_x.append(change.embedding)
                    self.face_identity[change.face_id] = ident
                    self.counts[ident] = self.counts.get(ident, 0) + 1
                    self.most_faces = max(self.most_faces, self.counts[ident])
                elif change.op == "remove" and change.face_id in self.face_identity:
                    flush()  # a remove after an add of the same face in this batch must find it in the index
                    self._index.remove(np.asarray([change.face_id], np.int64))
                    ident = self.face_identity.pop(change.face_id)
                    self.counts[ident] -= 1
                    if not self.counts[ident]:
                        del self.counts[ident]
                        gone = self.names.pop(ident, None)
                        self.by_name.pop(gone, None)
                        if gone is not None and self.by_key.get(identity_key(gone)) == ident:
                            del self.by_key[identity_key(gone)]
                self.seq = change.seq
            flush()
            return len(changes)

    def _caught_up(self) -> None:
        """catch_up after this process's own committed write: the write stands even when the database went away
        right after it (answering 503 would make the client send it again); the listener catches up later."""
        try:
            self.catch_up()
        except DatabaseUnavailable as err:
            log.warning("a write committed but the index could not catch up yet: %s", err)

    def _name(self, ident: int, name: str) -> None:
        old = self.names.get(ident)
        if old != name:
            if old is not None and self.by_name.get(old) == ident:
                del self.by_name[old]
            if old is not None and self.by_key.get(identity_key(old)) == ident:
                del self.by_key[identity_key(old)]
            self.names[ident] = name
            self.by_name[name] = ident
            self.by_key[identity_key(name)] = ident

    def _not_look_alike(self, name: str, renaming: Optional[str] = None) -> None:
        """ConflictError (409) when ``name`` is new but looks like an enrolled identity (the same NFKC, case-folded
        key: "ａｌｉｃｅ" or "Alice" beside "alice"), other than the one being renamed."""
        ident = self.by_key.get(identity_key(name))
        if ident is None or self.names.get(ident) == name or (renaming is not None and
                                                              self.by_name.get(renaming) == ident):
            return
        other = self.names.get(ident, "?")
        raise ConflictError(f"identity {name!r} looks like the enrolled {other!r} (they differ only in case, width or "
                            f"form); enrol into {other!r} or choose a name that reads differently")

    # ------------------------------------------------------------------ reads
    @property
    def size(self) -> int:
        return self._index.size

    def identities(self) -> dict[str, int]:
        """Enrolled names -> number of faces, in enrolment order."""
        with self._apply:  # a catch-up on another thread must not change the tables while they are read whole
            return {self.names[i]: c for i, c in sorted(self.counts.items()) if i in self.names}

    def count(self, identity: str) -> int:
        ident = self.by_name.get(identity)
        return self.counts.get(ident, 0) if ident is not None else 0

    def search(self, embeddings: np.ndarray, k: int) -> list[list[dict]]:
        """Top-k identities per query: [{"identity", "score", "face"}] (an identity's score: its best face's)."""
        q = unit_rows(embeddings)
        k_faces = int(min(self.size, max(k, (k - 1) * self.most_faces + 1)))
        scores, faces = self._index.search(q, k_faces)
        results = []
        for row_s, row_f in zip(scores, faces):
            seen, hits = set(), []
            for s, f in zip(row_s.tolist(), row_f.tolist()):
                ident = self.face_identity.get(f)
                if ident is None or ident in seen:  # -1 (fewer than asked), or removed while searching
                    continue
                seen.add(ident)
                hits.append({"identity": self.names.get(ident, "?"), "score": float(s), "face": int(f)})
                if len(hits) == k:
                    break
            results.append(hits)
        return results

    def faces_of(self, identity: str) -> Optional[list[dict]]:
        return self._db.faces_of(identity)

    # ------------------------------------------------------------------ writes (each one transaction)
    def enroll(self, identity: str, embeddings: np.ndarray, sources: Sequence[str]) -> tuple[list[int], int]:
        """Add one identity's faces; returns (their face ids, the identity's face count after the change)."""
        self._not_look_alike(identity)
        ids = self._db.add_faces(identity, np.asarray(embeddings, np.float32), list(sources), self.model)
        self._caught_up()
        return ids, self.count(identity)

    def delete(self, identity: str) -> int:
        """Remove an identity; returns how many faces it had (0: not enrolled, nothing written)."""
        removed = self._db.delete_identity(identity)
        self._caught_up()
        return removed

    def delete_face(self, face_id: int) -> Optional[str]:
        """Remove one face; returns its identity's name (None: no such face)."""
        name = self._db.delete_face(face_id)
        self._caught_up()
        return name

    def rename(self, old: str, new: str) -> bool:
        self._not_look_alike(new, renaming=old)
        renamed = self._db.rename(old, new)
        self._caught_up()
        return renamed


def database_target(gallery: Optional[str | Path], db: Optional[str]) -> str:
    """Where the gallery lives: --db's URL or file, GALLERY/gallery.sqlite, or ":memory:"."""
    if db:
        return db
    if gallery is None:
        return ":memory:"
    folder = Path(gallery)
    if folder.suffix in (".sqlite", ".db") and not folder.is_dir():
        return str(folder)
    return str(folder / SQLITE_FILE)


def open_store(gallery: Optional[str | Path], db: Optional[str], dim: int, *, model: str = "",
               index: str = "flat", nprobe: Optional[int] = None, ef_search: Optional[int] = None) -> GalleryStore:
    """The service's store: checks and prepares the gallery folder (migrating the earlier format), opens the
    database and loads the index."""
    target = database_target(gallery, db)
    if gallery is not None and not db and Path(target).parent == Path(gallery):
        prepare_folder(Path(gallery), dim, model)
    return GalleryStore(open_database(target, dim), model=model, index=index, nprobe=nprobe, ef_search=ef_search)


def prepare_folder(folder: Path, dim: int, model: str) -> None:
    """A gallery folder ready for its database: created 0700, refused when it holds something else, and a
    gallery of the folder format (facesiam gallery build) imported once into GALLERY/gallery.sqlite."""
    database = folder / SQLITE_FILE
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--gallery {folder} is a file; pass a folder (the database goes to {database})")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if folder.stat().st_mode & 0o077:
        folder.chmod(0o700)  # the embeddings are biometric data: only this user may list or read the folder
        log.info("%s: permissions set to 0700 (owner only)", folder)
    recover_directory(folder, marker=META_FILE, clean_staging=True)  # a folder-format save cut short by a kill
    if database.exists():
        return
    if (folder / META_FILE).is_file():
        migrate_folder(folder, database, dim, model)
    elif any(p.name not in (SQLITE_FILE + "-wal", SQLITE_FILE + "-shm") for p in folder.iterdir()):
        raise InputError(f"--gallery {folder} exists but is not a gallery (no {SQLITE_FILE} or {META_FILE}); pass a "
                         "gallery folder, or a new or empty one to start a gallery there")


def migrate_folder(folder: Path, database: Path, dim: int, model: str) -> int:
    """Import a folder-format gallery into ``database``; the old files move to folder/folder-format-DATE/."""
    old = Gallery.load(folder)
    if old.index.d != dim:
        raise InputError(f"gallery {folder} holds {old.index.d}-d embeddings but the model makes {dim}-d ones; serve "
                         f"it with the model it was built with ({old.meta.get('checkpoint', 'see gallery.json')})")
    partial = database.with_name(database.name + ".importing")
    for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
        leftover.unlink(missing_ok=True)  # an import cut short: start it again
    db = open_database(partial, dim)
    try:
        names = [old.names[i] for i in old.identity]
        db.add_many(names, old.vectors(), [p or "imported" for p in old.paths], old.meta.get("checkpoint") or model)
    finally:
        db.close()
    os.replace(partial, database)  # the database appears whole or not at all
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    keep = folder / f"folder-format-{stamp}"
    keep.mkdir(mode=0o700)
    for name in (META_FILE, INDEX_FILE, ENTRIES_FILE):
        os.replace(folder / name, keep / name)
    log.warning("%s: migrated %d faces of %d identities from the folder format into %s (the old files are in %s; "
                "delete them once the service works)", folder, old.size, len(old.names), database.name, keep.name)
    return old.size
