"""The service's gallery: a database (SQLite, PostgreSQL) followed by an index in memory. Expected results come from
brute-force numpy over what was written; PostgreSQL runs on a real server started by the test (skipped cleanly
where Debian's postgresql package is missing)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from facesiam.errors import InputError
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
    with pytest.raises(InputError, match="exists already"):
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
