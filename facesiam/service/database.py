"""The gallery's source of truth: identities and their faces (embeddings) in SQLite or PostgreSQL.

    open_database("GALLERY/gallery.sqlite")           one process; a file, nothing to start (the default)
    open_database("postgresql://user@host/db")        several service processes or machines on one gallery

Three tables: ``identities`` (id, name), ``faces`` (id, identity, embedding as float32 bytes, source, model, time)
and ``changes`` (an append-only log: seq, op add/remove/rename, face, identity). Every write is one transaction
that also appends its changes; a process's in-memory index (service/live_index.py) follows the log in seq order
(``changes_since``), so the same code applies its own writes and other processes' writes. PostgreSQL writers take
one advisory lock per transaction, which makes seq order equal commit order (otherwise a reader could see seq 11
before seq 10 commits and skip 10 forever), and notify ``CHANNEL`` so other processes catch up at once. A
connection that is lost (PostgreSQL restarted) raises DatabaseUnavailable (the service answers 503) and is reopened
by the next call, backing off while the database stays away; the listener then catches up by seq.

The SQL is a handful of statements on the standard drivers (sqlite3, psycopg 3) rather than an ORM: both backends
need the same five queries, and LISTEN/NOTIFY needs the driver itself. Embeddings are binary columns (pgvector is
not in Debian's packages, and the search runs in FAISS anyway).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from ..errors import ConflictError, FacesiamError, InputError

log = logging.getLogger("facesiam.serve")

SCHEMA_VERSION = 2  # 2: SQLite ids are AUTOINCREMENT (a deleted face's id is never given to another)
CHANNEL = "facesiam_gallery"
SQLITE_FILE = "gallery.sqlite"
LOAD_CHUNK = 20_000  # rows per fetch when loading a gallery (bounds the memory of the Python row objects)
RETRY_FIRST, RETRY_MAX = 0.5, 5.0  # seconds between reconnection attempts to a database that went away (doubling)
RECONNECT_TIMEOUT = 3  # seconds a reconnection attempt may take (requests wait for it)


class DatabaseUnavailable(FacesiamError):
    """The database cannot be reached now (restarting, down, network): the service answers 503 and reconnects."""

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS identities (id {id}, name TEXT NOT NULL UNIQUE, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS faces (id {id}, identity_id BIGINT NOT NULL REFERENCES identities(id),
    embedding {blob} NOT NULL, source TEXT NOT NULL, model TEXT NOT NULL, created TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS faces_identity ON faces(identity_id);
CREATE TABLE IF NOT EXISTS changes (seq {id}, op TEXT NOT NULL, face_id BIGINT, identity_id BIGINT);
"""


@dataclass
class Change:
    """One entry of the change log, with what applying it needs (the face's embedding for an add)."""

    seq: int
    op: str  # "add" | "remove" | "rename"
    face_id: Optional[int]
    identity_id: Optional[int]
    name: Optional[str]  # the identity's current name (None: deleted since)
    embedding: Optional[np.ndarray]  # for "add" (None: the face was deleted since; a later "remove" follows)


@dataclass
class Snapshot:
    """Every face at one point of the log: ids, identity ids, embeddings (n x dim), names, last seq."""

    face_ids: np.ndarray
    identity_ids: np.ndarray
    embeddings: np.ndarray
    names: dict[int, str]
    seq: int


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class FaceDatabase:
    """The operations the service needs, on a DB-API connection (subclasses: the dialect and the connection).

    One connection guarded by a lock: every statement here takes milliseconds, and one connection keeps a
    process's writes in order."""

    kind = ""
    blob = "BLOB"
    id_type = "INTEGER PRIMARY KEY AUTOINCREMENT"  # ids never reused: a client's "face 7" stays that face or none

    def __init__(self, target: str, dim: Optional[int]):
        self.target, self.dim = target, dim
        self._lock = threading.RLock()
        self.on_statement: Optional[Callable[[float], None]] = None  # told each statement's seconds (/metrics)
        self._retry_at, self._backoff, self.lost = 0.0, RETRY_FIRST, None  # lost: why the connection went away
        self._answered = float("-inf")  # when ping last succeeded
        self.conn = self._connect()
        self._create()

    # ------------------------------------------------------------------ dialect
    def _connect(self):
        raise NotImplementedError

    def _reconnect(self):
        """A new connection after the last one was lost (driver errors propagate)."""
        return self._connect()

    def _lost_errors(self) -> tuple:
        """The driver's errors that mean the connection is gone (the database restarted, the network dropped)."""
        return ()

    def _sql(self, statement: str) -> str:
        return statement

    def _begin_write(self, cur) -> None:
        raise NotImplementedError

    def _after_write(self, cur) -> None:
        """Inside the write transaction, after its changes (PostgreSQL: NOTIFY)."""

    def describe(self) -> str:
        return f"{self.kind} {self.target}"

    # ------------------------------------------------------------------ plumbing
    def _run(self, cur, statement: str, params: Sequence = ()):
        t = time.perf_counter()
        cur.execute(self._sql(statement), tuple(params))
        if self.on_statement is not None:
            self.on_statement(time.perf_counter() - t)
        return cur

    @contextmanager
    def _connection(self) -> Iterator:
        """The connection, under the lock; reconnected when lost (at most once per backoff interval, which doubles
        up to RETRY_MAX while the database stays away). A lost connection raises DatabaseUnavailable (503): a write
        cut off mid-transaction may or may not have committed, so it is not retried here; the client retries."""
        with self._lock:
            if self.conn is None:
                if time.monotonic() < self._retry_at:
                    raise DatabaseUnavailable(self._unavailable())
                try:
                    self.conn = self._reconnect()
                except self._lost_errors() as err:
                    self._retry_at = time.monotonic() + self._backoff
                    self._backoff = min(RETRY_MAX, self._backoff * 2)
                    self.lost = _first_line(err)
                    raise DatabaseUnavailable(self._unavailable()) from None
                log.warning("gallery database %s reachable again", self.describe())
                self._backoff, self.lost = RETRY_FIRST, None
            try:
                yield self.conn
            except self._lost_errors() as err:
                self.lost = _first_line(err)
                log.warning("gallery database %s lost (%s); reconnecting", self.describe(), self.lost)
                try:
                    self.conn.close()
                except Exception:  # closing a broken connection may fail too; it is dropped either way
                    pass
                self.conn, self._retry_at = None, 0.0  # the next call tries at once, then backs off
                raise DatabaseUnavailable(self._unavailable()) from None

    def _unavailable(self) -> str:
        return f"the gallery database is unreachable ({self.lost}); retry in a few seconds"

    def ping(self) -> bool:
        """Whether the database answers now (reconnecting if it went away); a success counts for a second, so a
        load balancer polling /readyz (a public route) costs the database at most one query a second."""
        if self.conn is not None and time.monotonic() - self._answered < 1.0:
            return True
        try:
            with self._connection() as conn:
                cur = conn.cursor()
                try:
                    cur.execute("SELECT 1")
                    conn.commit()
                finally:
                    cur.close()
            self._answered = time.monotonic()
            return True
        except DatabaseUnavailable:
            return False

    def _write(self, work: Callable) -> object:
        """``work(cursor)`` in one write transaction (committed, or rolled back on any error)."""
        with self._connection() as conn:
            cur = conn.cursor()
            try:
                self._begin_write(cur)
                result = work(cur)
                self._after_write(cur)
                conn.commit()
                return result
            except BaseException:
                try:
                    conn.rollback()
                except self._lost_errors():  # the connection is gone: the original error says why
                    pass
                raise
            finally:
                try:
                    cur.close()
                except self._lost_errors():
                    pass

    def _create(self) -> None:
        def create(cur):
            for statement in _TABLES.format(id=self.id_type, blob=self.blob).split(";"):
                if statement.strip():
                    self._run(cur, statement)
            meta = dict(self._run(cur, "SELECT key, value FROM meta").fetchall())
            if self.dim is None:  # opened to read (export): the gallery says its dimension
                if "dim" not in meta:
                    raise InputError(f"{self.describe()} holds no gallery (no faces were ever enrolled there)")
                self.dim = int(meta["dim"])
            if not meta:
                for key, value in (("schema", SCHEMA_VERSION), ("dim", self.dim), ("created", now())):
                    self._run(cur, "INSERT INTO meta (key, value) VALUES (?, ?)", (key, str(value)))
            elif int(meta.get("dim", self.dim)) != self.dim:
                raise InputError(f"gallery database {self.describe()} holds {meta['dim']}-d embeddings but the model "
                                 f"makes {self.dim}-d ones; serve it with the model it was built with, or use a new "
                                 "gallery")
            elif int(meta.get("schema", 0)) > SCHEMA_VERSION:
                raise InputError(f"gallery database {self.describe()} has schema {meta['schema']}, newer than this "
                                 f"facesiam's {SCHEMA_VERSION}; upgrade facesiam")
            elif int(meta.get("schema", SCHEMA_VERSION)) < SCHEMA_VERSION:
                self._upgrade(cur, int(meta["schema"]))
                self._run(cur, "UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
                log.info("gallery database %s: schema %s upgraded to %d", self.describe(), meta["schema"],
                         SCHEMA_VERSION)

        self._write(create)

    def _upgrade(self, cur, version: int) -> None:
        """Bring a gallery of schema ``version`` up to SCHEMA_VERSION, inside the opening transaction."""

    def close(self) -> None:
        with self._lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            self._retry_at = float("inf")  # closed for good: no reconnection

    # ------------------------------------------------------------------ writes
    def add_faces(self, identity: str, embeddings: np.ndarray, sources: Sequence[str], model: str) -> list[int]:
        """Add faces of one identity (created if new); returns their face ids."""
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        self._check_dim(x)

        def add(cur):
            ident = self._identity_id(cur, identity, create=True)
            stamp, ids = now(), []
            for row, source in zip(x, sources):
                ids.append(self._insert_face(cur, ident, row.tobytes(), source, model, stamp))
            self._log(cur, [("add", i, ident) for i in ids])
            return ids

        return self._write(add)

    def add_many(self, identities: Sequence[str], embeddings: np.ndarray, sources: Sequence[str], model: str,
                 progress: Optional[Callable[[int], None]] = None, chunk: int = 10_000) -> int:
        """Bulk import (gallery import, migration): one transaction per ``chunk`` faces; returns the count."""
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        self._check_dim(x)
        for start in range(0, len(x), chunk):
            def add(cur, start=start):
                stamp, known, log_rows = now(), {}, []
                for i in range(start, min(start + chunk, len(x))):
                    name = identities[i]
                    if name not in known:
                        known[name] = self._identity_id(cur, name, create=True)
                    face = self._insert_face(cur, known[name], x[i].tobytes(), sources[i], model, stamp)
                    log_rows.append(("add", face, known[name]))
                self._log(cur, log_rows)

            self._write(add)
            if progress is not None:
                progress(min(chunk, len(x) - start))
        return len(x)

    def delete_identity(self, identity: str) -> int:
        """Delete an identity and its faces; returns how many faces it had (0: not enrolled)."""

        def delete(cur):
            ident = self._identity_id(cur, identity, create=False)
            if ident is None:
                return 0
            faces = [r[0] for r in self._run(cur, "SELECT id FROM faces WHERE identity_id = ?", (ident,))]
            self._run(cur, "DELETE FROM faces WHERE identity_id = ?", (ident,))
            self._run(cur, "DELETE FROM identities WHERE id = ?", (ident,))
            self._log(cur, [("remove", f, ident) for f in faces])
            return len(faces)

        return self._write(delete)

    def delete_face(self, face_id: int) -> Optional[str]:
        """Delete one face (and its identity when it was the last); returns the identity's name (None: no face)."""

        def delete(cur):
            row = self._run(cur, "SELECT f.identity_id, i.name FROM faces f JOIN identities i ON i.id = "
                                 "f.identity_id WHERE f.id = ?", (face_id,)).fetchone()
            if row is None:
                return None
            ident, name = row
            self._run(cur, "DELETE FROM faces WHERE id = ?", (face_id,))
            if self._run(cur, "SELECT COUNT(*) FROM faces WHERE identity_id = ?", (ident,)).fetchone()[0] == 0:
                self._run(cur, "DELETE FROM identities WHERE id = ?", (ident,))
            self._log(cur, [("remove", face_id, ident)])
            return name

        return self._write(delete)

    def rename(self, old: str, new: str) -> bool:
        """Rename an identity (False: no such identity); InputError when ``new`` is taken."""

        def rename(cur):
            ident = self._identity_id(cur, old, create=False)
            if ident is None:
                return False
            if old != new and self._identity_id(cur, new, create=False) is not None:
                raise ConflictError(f"identity {new!r} exists already; delete it or choose another name")
            self._run(cur, "UPDATE identities SET name = ? WHERE id = ?", (new, ident))
            self._log(cur, [("rename", None, ident)])
            return True

        return self._write(rename)

    def _check_dim(self, x: np.ndarray) -> None:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InputError(f"embeddings of shape {x.shape}; this gallery holds {self.dim}-d embeddings")

    def _identity_id(self, cur, name: str, *, create: bool) -> Optional[int]:
        row = self._run(cur, "SELECT id FROM identities WHERE name = ?", (name,)).fetchone()
        if row is not None or not create:
            return row[0] if row else None
        return self._run(cur, "INSERT INTO identities (name, created) VALUES (?, ?) RETURNING id",
                         (name, now())).fetchone()[0]

    def _insert_face(self, cur, ident: int, blob: bytes, source: str, model: str, stamp: str) -> int:
        return self._run(cur, "INSERT INTO faces (identity_id, embedding, source, model, created) "
                              "VALUES (?, ?, ?, ?, ?) RETURNING id", (ident, blob, source, model, stamp)).fetchone()[0]

    def _log(self, cur, rows: list[tuple]) -> None:
        if rows:
            cur.executemany(self._sql("INSERT INTO changes (op, face_id, identity_id) VALUES (?, ?, ?)"), rows)

    # ------------------------------------------------------------------ reads
    def snapshot(self) -> Snapshot:
        """Every face and the last seq, read in one transaction (consistent with each other)."""
        with self._connection() as conn:
            cur = self._read_cursor(conn)
            try:
                seq = self._run(cur, "SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
                names = dict(self._run(cur, "SELECT id, name FROM identities").fetchall())
                ids, idents, blobs = [], [], []
                self._run(cur, "SELECT id, identity_id, embedding FROM faces ORDER BY id")
                while rows := cur.fetchmany(LOAD_CHUNK):
                    for face, ident, blob in rows:
                        ids.append(face)
                        idents.append(ident)
                        blobs.append(bytes(blob))
                conn.commit()
            finally:
                cur.close()
        x = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), self.dim)
        return Snapshot(np.asarray(ids, np.int64), np.asarray(idents, np.int64), x, names, int(seq))

    def _read_cursor(self, conn):
        return conn.cursor()

    def changes_since(self, seq: int) -> list[Change]:
        """The log after ``seq``, in order, with the embeddings of added faces and identities' current names.

        Three lookups by primary key rather than one join: a planner without fresh statistics (right after a bulk
        import) may otherwise scan every face for a catch-up of one."""
        with self._connection() as conn:
            cur = conn.cursor()
            try:
                rows = self._run(cur, "SELECT seq, op, face_id, identity_id FROM changes WHERE seq > ? ORDER BY seq",
                                 (seq,)).fetchall()
                added = sorted({face for _, op, face, _ in rows if op == "add"})
                idents = sorted({ident for *_, ident in rows if ident is not None})
                blobs = dict(self._select_in(cur, "SELECT id, embedding FROM faces WHERE id IN ({})", added))
                names = dict(self._select_in(cur, "SELECT id, name FROM identities WHERE id IN ({})", idents))
                conn.commit()
            finally:
                cur.close()
        return [Change(s, op, face, ident, names.get(ident),
                       np.frombuffer(bytes(blobs[face]), np.float32) if op == "add" and face in blobs else None)
                for s, op, face, ident in rows]

    def _select_in(self, cur, statement: str, keys: list, chunk: int = 500) -> list:
        out = []
        for start in range(0, len(keys), chunk):
            part = keys[start:start + chunk]
            out += self._run(cur, statement.format(", ".join("?" * len(part))), part).fetchall()
        return out

    def faces_of(self, identity: str) -> Optional[list[dict]]:
        """An identity's faces (id, source, model, created), oldest first; None: no such identity."""
        with self._connection() as conn:
            cur = conn.cursor()
            try:
                ident = self._identity_id(cur, identity, create=False)
                rows = [] if ident is None else self._run(
                    cur, "SELECT id, source, model, created FROM faces WHERE identity_id = ? ORDER BY id",
                    (ident,)).fetchall()
                conn.commit()
            finally:
                cur.close()
        if ident is None:
            return None
        return [{"id": int(i), "source": s, "model": m, "created": c} for i, s, m, c in rows]

    def export(self) -> Iterator[tuple[int, str, np.ndarray, str, str, str]]:
        """Every face as (id, identity, embedding, source, model, created), in id order."""
        with self._connection() as conn:
            cur = self._read_cursor(conn)
            try:
                self._run(cur, "SELECT f.id, i.name, f.embedding, f.source, f.model, f.created FROM faces f "
                               "JOIN identities i ON i.id = f.identity_id ORDER BY f.id")
                while rows := cur.fetchmany(LOAD_CHUNK):
                    for face, name, blob, source, model, created in rows:
                        yield int(face), name, np.frombuffer(bytes(blob), np.float32), source, model, created
                conn.commit()
            finally:
                cur.close()

    def listen(self, on_change: Callable[[], None], stop: threading.Event) -> Optional[threading.Thread]:
        """Call ``on_change`` when another process may have written (None: nobody else can write)."""
        return None


class SQLiteDatabase(FaceDatabase):
    """One file (WAL; synchronous=FULL, so an acknowledged write survives a kill -9 and a power cut)."""

    kind = "sqlite"

    def _connect(self):
        memory = self.target == ":memory:"
        if not memory:
            path = Path(self.target)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not path.exists():
                # created 0600 before SQLite opens it: the embeddings are biometric data (the -wal and -shm files
                # SQLite makes beside it take the same permissions)
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(self.target, check_same_thread=False, isolation_level=None, timeout=30)
        if not memory:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return _SQLiteConnection(conn)

    def _begin_write(self, cur) -> None:
        cur.execute("BEGIN IMMEDIATE")

    def _upgrade(self, cur, version: int) -> None:
        """Schema 1 -> 2: identities and faces rebuilt with AUTOINCREMENT ids (SQLite cannot add it in place), the
        next ids past every id the change log ever named: a face deleted before the upgrade is not reused either."""
        if version >= 2:
            return
        columns = {"identities": "id, name, created", "faces": "id, identity_id, embedding, source, model, created"}
        new = {"identities": "(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, created TEXT NOT NULL)",
               "faces": "(id INTEGER PRIMARY KEY AUTOINCREMENT, identity_id BIGINT NOT NULL REFERENCES "
                        "identities_v2(id), embedding BLOB NOT NULL, source TEXT NOT NULL, model TEXT NOT NULL, "
                        "created TEXT NOT NULL)"}
        for table in ("identities", "faces"):  # the faces' foreign key follows identities_v2 when it is renamed
            cur.execute(f"CREATE TABLE {table}_v2 {new[table]}")
            cur.execute(f"INSERT INTO {table}_v2 ({columns[table]}) SELECT {columns[table]} FROM {table}")
        cur.execute("DROP TABLE faces")
        cur.execute("DROP TABLE identities")
        cur.execute("ALTER TABLE identities_v2 RENAME TO identities")
        cur.execute("ALTER TABLE faces_v2 RENAME TO faces")
        cur.execute("CREATE INDEX faces_identity ON faces(identity_id)")
        for table, logged in (("identities", "identity_id"), ("faces", "face_id")):
            high = cur.execute(f"SELECT MAX(COALESCE((SELECT MAX(id) FROM {table}), 0), "
                               f"COALESCE((SELECT MAX({logged}) FROM changes), 0))").fetchone()[0]
            cur.execute("DELETE FROM sqlite_sequence WHERE name = ?", (table,))
            cur.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, high))

    def _read_cursor(self, conn):
        cur = conn.cursor()
        cur.execute("BEGIN")  # one snapshot for every statement of a read (WAL readers never block the writer)
        return cur


class _SQLiteConnection:
    """sqlite3 in autocommit mode with explicit BEGIN: commit/rollback only when a transaction is open."""

    def __init__(self, conn: sqlite3.Connection):
        self.raw = conn

    def cursor(self):
        return self.raw.cursor()

    def commit(self) -> None:
        if self.raw.in_transaction:
            self.raw.execute("COMMIT")

    def rollback(self) -> None:
        if self.raw.in_transaction:
            self.raw.execute("ROLLBACK")

    def close(self) -> None:
        self.raw.close()


class PostgresDatabase(FaceDatabase):
    """PostgreSQL through psycopg 3: several service processes follow each other by LISTEN/NOTIFY."""

    kind = "postgresql"
    blob = "BYTEA"
    id_type = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"  # never reuses an id
    LOCK_KEY = 0x66616365  # "face": the advisory lock every writer takes, making seq order commit order

    def _connect(self):
        psycopg = _psycopg()
        try:
            return psycopg.connect(self.target, connect_timeout=10)
        except psycopg.OperationalError as err:
            raise InputError(f"cannot connect to --db {_redact(self.target)}: {_first_line(err)}") from None

    def _reconnect(self):
        return _psycopg().connect(self.target, connect_timeout=RECONNECT_TIMEOUT)

    def _lost_errors(self) -> tuple:
        psycopg = _psycopg()
        return psycopg.OperationalError, psycopg.InterfaceError

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def _begin_write(self, cur) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (self.LOCK_KEY,))

    def _after_write(self, cur) -> None:
        cur.execute(f"NOTIFY {CHANNEL}")

    def _read_cursor(self, conn):
        conn.isolation_level = _psycopg().IsolationLevel.REPEATABLE_READ
        return _ResetIsolation(conn, conn.cursor())

    def describe(self) -> str:
        return f"{self.kind} {_redact(self.target)}"

    def listen(self, on_change: Callable[[], None], stop: threading.Event) -> threading.Thread:
        psycopg = _psycopg()

        def follow():
            backoff, lost = RETRY_FIRST, False
            while not stop.is_set():
                try:
                    with psycopg.connect(self.target, autocommit=True, connect_timeout=RECONNECT_TIMEOUT) as conn:
                        conn.execute(f"LISTEN {CHANNEL}")
                        on_change()  # catch up by seq on whatever happened while not listening
                        if lost:
                            log.warning("gallery notifications from %s back", self.describe())
                        backoff, lost = RETRY_FIRST, False
                        while not stop.is_set():
                            # the timeout bounds how long stop takes; a quiet minute also re-checks the log
                            for _ in conn.notifies(timeout=1.0, stop_after=1):
                                on_change()
                except Exception as err:  # a dropped connection: reconnect (backing off), then catch up by seq
                    # one warning when lost, not one a second while the database stays away
                    log.log(logging.DEBUG if lost else logging.WARNING, "gallery notifications from %s lost (%s); "
                            "reconnecting", self.describe(), _first_line(err))
                    lost = True
                    stop.wait(backoff)
                    backoff = min(RETRY_MAX, backoff * 2)

        thread = threading.Thread(target=follow, name="gallery-listen", daemon=True)
        thread.start()
        return thread


class _ResetIsolation:
    """A psycopg cursor that puts the connection back to the default isolation when closed."""

    def __init__(self, conn, cur):
        self._conn, self._cur = conn, cur

    def __getattr__(self, name):
        return getattr(self._cur, name)

    def close(self) -> None:
        self._cur.close()
        self._conn.isolation_level = None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise InputError('a PostgreSQL gallery needs psycopg: pip install -e ".[postgres]"') from None
    return psycopg


def _redact(url: str) -> str:
    """A database URL without its password (for logs and errors)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def open_database(target: str | Path, dim: Optional[int], *, create: bool = True) -> FaceDatabase:
    """A PostgreSQL URL (postgresql://, postgres://), ":memory:", or a SQLite file's path. ``dim=None`` reads the
    gallery's own; ``create=False`` refuses a SQLite file that does not exist (instead of starting one there)."""
    target = str(target)
    if target.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(target, dim)
    if not create and target != ":memory:" and not Path(target).is_file():
        raise InputError(f"no gallery database at {target}; pass the gallery folder or file facesiam serve uses "
                         f"(GALLERY/{SQLITE_FILE}) or a postgresql:// URL")
    return SQLiteDatabase(target, dim)
