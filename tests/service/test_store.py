"""The service's gallery: a database (SQLite, PostgreSQL) followed by an index in memory. Expected results come from
brute-force numpy over what was written; PostgreSQL runs on a real server started by the test (skipped cleanly
where Debian's postgresql package is missing)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from facesiam.errors import ConflictError, InputError
from facesiam.eval.gallery import Gallery
from facesiam.service.database import open_database
from facesiam.service.live_index import LiveIndex
from facesiam.service.store import GalleryStore, open_store

pytestmark = pytest.mark.timeout(180)

DIM = 16


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(store_rows: dict, q: np.ndarray, k: int) -> list[tuple[str, float]]:
    """Top-k identities (best face's cosine) by numpy over {face id: (name, vector)}."""
    best: dict[str, float] = {}
    for name, v in store_rows.values():
        best[name] = max(best.get(name, -2.0), float(unit(v[None])[0] @ unit(q[None])[0]))
    return sorted(best.items(), key=lambda t: -t[1])[:k]


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "g" / "gallery.sqlite")
    return request.getfixturevalue("postgres_db")


def exercise(store: GalleryStore, rng) -> dict:
    """Enrol, add, rename, delete faces and people; check search against brute force after each step."""
    rows: dict[int, tuple[str, np.ndarray]] = {}

    def enrol(name, n):
        x = rng.normal(size=(n, DIM)).astype(np.float32)
        ids, count = store.enroll(name, x, ["upload"] * n)
        rows.update({i: (name, v) for i, v in zip(ids, x)})
        assert count == sum(1 for nm, _ in rows.values() if nm == name)
        return ids

    def check():
        assert store.size == len(rows)
        assert store.identities() == {n: sum(1 for nm, _ in rows.values() if nm == n)
                                      for n in dict.fromkeys(nm for _, (nm, _) in sorted(rows.items()))}
        for q in rng.normal(size=(5, DIM)):
            got = store.search(q[None], 3)[0]
            want = brute(rows, q, 3)
            assert [h["identity"] for h in got] == [n for n, _ in want]
            assert [h["score"] for h in got] == pytest.approx([s for _, s in want], abs=1e-5)

    for i in range(6):
        enrol(f"p{i}", 1 + i % 3)
    check()
    more = enrol("p0", 2)  # adds to a person
    check()
    assert store.rename("p1", "Ann") and not store.rename("nobody", "x")
    rows = {i: ("Ann" if n == "p1" else n, v) for i, (n, v) in rows.items()}
    with pytest.raises(ConflictError):  # a type the service maps to 409, whatever the message says
        store.rename("Ann", "p2")
    check()
    assert store.delete_face(more[0]) == "p0" and store.delete_face(more[0]) is None
    del rows[more[0]]
    check()
    assert store.delete("p3") == 1 + 3 % 3 and store.delete("p3") == 0
    rows = {i: r for i, r in rows.items() if r[0] != "p3"}
    check()
    lone = [i for i, (n, _) in rows.items() if n == "p0"]
    for face in lone:  # deleting an identity's last face deletes the identity
        store.delete_face(face)
        del rows[face]
    assert "p0" not in store.identities() and store.faces_of("p0") is None
    check()
    faces = store.faces_of("Ann")
    assert [f["id"] for f in faces] == sorted(i for i, (n, _) in rows.items() if n == "Ann")
    assert {f["source"] for f in faces} == {"upload"} and {f["model"] for f in faces} == {"m1"}
    return rows


def test_store_matches_brute_force_and_survives_a_restart(target):
    rng = np.random.default_rng(0)
    store = GalleryStore(open_database(target, DIM), model="m1")
    rows = exercise(store, rng)
    store.close()
    again = GalleryStore(open_database(target, DIM), model="m1")  # a restart: rebuilt from the database alone
    assert again.size == len(rows)
    for q in rng.normal(size=(5, DIM)):
        assert [h["identity"] for h in again.search(q[None], 3)[0]] == [n for n, _ in brute(rows, q, 3)]
    again.close()
    with pytest.raises(InputError, match="32-d"):
        open_database(target, 32)  # the model must make embeddings of the gallery's size


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_add_and_remove_in_place(kind):
    rng = np.random.default_rng(1)
    x = unit(rng.normal(size=(2000, DIM)))
    ids = np.arange(10, 2010, dtype=np.int64)
    index = LiveIndex(DIM, kind, vectors=x, ids=ids)
    assert index.kind == kind and index.recall >= 0.99
    new = unit(rng.normal(size=(3, DIM)))
    index.add(np.array([5000, 5001, 5002]), new)
    scores, found = index.search(new, 1)
    assert found[:, 0].tolist() == [5000, 5001, 5002] and scores[:, 0] == pytest.approx(1.0, abs=1e-5)
    index.remove(np.array([5001, 10]))
    _, found = index.search(np.r_[new[1:2], x[:1]], 5)
    assert 5001 not in found and 10 not in found
    assert index.size == 2001


def test_two_processes_on_one_postgresql_follow_each_other(postgres_db):
    rng = np.random.default_rng(2)
    first = GalleryStore(open_database(postgres_db, DIM), model="m1")
    second = GalleryStore(open_database(postgres_db, DIM), model="m1")
    second.follow()  # LISTEN/NOTIFY: the second learns of the first's writes without being asked
    try:
        x = rng.normal(size=(2, DIM)).astype(np.float32)
        first.enroll("alice", x, ["upload", "upload"])
        deadline = time.monotonic() + 5
        while second.size < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert second.search(x[:1], 1)[0][0]["identity"] == "alice"
        second.enroll("bob", x[1:] + 1, ["upload"])  # the other way round, and the seq order stays whole
        first.catch_up()
        assert first.identities() == second.identities() == {"alice": 2, "bob": 1}
        first.rename("alice", "Alice")
        first.delete("bob")
        deadline = time.monotonic() + 5
        while second.identities() != {"Alice": 2} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert second.identities() == {"Alice": 2} and second.size == 2
    finally:
        first.close()
        second.close()


def test_a_folder_gallery_is_migrated_once_with_its_files_kept(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, DIM)).astype(np.float32)
    names = ["a", "a", "b", "c", "c", "c", "d"]
    Gallery.build(x, names, [f"data/{i}.jpg" for i in range(7)], meta={"checkpoint": "old"}).save(tmp_path / "g")
    store = open_store(tmp_path / "g", None, DIM, model="m1")
    assert store.identities() == {"a": 2, "b": 1, "c": 3, "d": 1}
    q = x[4]
    assert store.search(q[None], 1)[0][0]["identity"] == "c"
    assert [f["source"] for f in store.faces_of("b")] == ["data/2.jpg"]
    store.close()
    kept = list((tmp_path / "g").glob("folder-format-*"))
    assert len(kept) == 1 and sorted(p.name for p in kept[0].iterdir()) == ["entries.npz", "gallery.json",
                                                                             "index.faiss"]
    assert (tmp_path / "g" / "gallery.sqlite").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "g").stat().st_mode & 0o777 == 0o700
    again = open_store(tmp_path / "g", None, DIM, model="m1")  # the second start finds the database
    assert again.size == 7
    again.close()


def test_a_folder_holding_something_else_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="is not a gallery"):
        open_store(tmp_path / "photos", None, DIM)
    assert os.listdir(tmp_path / "photos") == ["holiday.jpg"]


def test_a_deleted_face_id_is_never_given_again(target):
    """Issue 40: SQLite gave a deleted face's id to the next enrolment (a client's "face 7" became someone else)."""
    db = open_database(target, DIM)
    try:
        x = unit(np.random.default_rng(0).normal(size=(2, DIM)))
        first = db.add_faces("a", x, ["t", "t"], "m")
        assert db.delete_face(first[-1]) == "a" and db.delete_identity("a") == 1
        assert min(db.add_faces("b", x[:1], ["t"], "m")) > max(first)
    finally:
        db.close()


def test_a_schema_1_sqlite_gallery_is_upgraded_to_ids_that_are_never_reused(tmp_path):
    """A gallery written before AUTOINCREMENT (schema 1): its faces, names and log are kept, the faces' foreign key
    still holds, and the next ids pass every id the log ever named (face 3 was deleted before the upgrade)."""
    import sqlite3

    path = tmp_path / "gallery.sqlite"
    x = unit(np.random.default_rng(1).normal(size=(3, DIM)))
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE identities (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created TEXT NOT NULL);
        CREATE TABLE faces (id INTEGER PRIMARY KEY, identity_id BIGINT NOT NULL REFERENCES identities(id),
            embedding BLOB NOT NULL, source TEXT NOT NULL, model TEXT NOT NULL, created TEXT NOT NULL);
        CREATE INDEX faces_identity ON faces(identity_id);
        CREATE TABLE changes (seq INTEGER PRIMARY KEY, op TEXT NOT NULL, face_id BIGINT, identity_id BIGINT);
        INSERT INTO meta VALUES ('schema', '1'), ('dim', '16'), ('created', 'then');
        INSERT INTO identities VALUES (1, 'ann', 'then'), (2, 'bo', 'then');
        INSERT INTO changes (op, face_id, identity_id) VALUES ('add', 1, 1), ('add', 2, 2), ('add', 3, 2),
            ('remove', 3, 2);
    """)
    conn.executemany("INSERT INTO faces VALUES (?, ?, ?, 't', 'm', 'then')", [(1, 1, x[0].tobytes()),
                                                                            (2, 2, x[1].tobytes())])
    conn.commit()
    conn.close()
    db = open_database(path, DIM)
    try:
        snap = db.snapshot()
        assert snap.face_ids.tolist() == [1, 2] and snap.names == {1: "ann", 2: "bo"} and snap.seq == 4
        np.testing.assert_array_equal(snap.embeddings, x[:2])
        assert db.add_faces("cy", x[2:], ["t"], "m") == [4]  # not 3: the log named it
        with pytest.raises(Exception, match="FOREIGN KEY"):
            db._write(lambda cur: db._run(cur, "INSERT INTO faces (identity_id, embedding, source, model, created) "
                                               "VALUES (99, x'00', 't', 'm', 'now')"))
    finally:
        db.close()
    check = sqlite3.connect(path)
    assert check.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("2",)
    assert "AUTOINCREMENT" in check.execute("SELECT sql FROM sqlite_master WHERE name = 'faces'").fetchone()[0]
    check.close()
    reopened = open_database(path, DIM)  # upgraded once: opening again changes nothing
    try:
        assert reopened.snapshot().face_ids.tolist() == [1, 2, 4]
    finally:
        reopened.close()
