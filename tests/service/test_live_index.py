"""The service's index (service/live_index.py): writes never wait for searches, results after concurrent writes and
merges equal a brute-force numpy reference, and an HNSW rebuild loses no enrolment made while it runs. A search or a
rebuild is held on an Event, so "the write did not wait" is an order of events, not a time."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest

from facesiam.service.database import open_database
from facesiam.service.live_index import MAX_TAILS, MERGE_NICENESS, LiveIndex
from facesiam.service.store import GalleryStore

pytestmark = pytest.mark.timeout(180)

DIM = 16


def unit(x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class HeldSearch:
    """A FAISS index whose first search stops until ``release`` is set (after setting ``entered``)."""

    def __init__(self, inner):
        self.inner, self.entered, self.release, self.held = inner, threading.Event(), threading.Event(), False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def search(self, q, k, **kw):
        if not self.held:
            self.held = True
            self.entered.set()
            assert self.release.wait(60), "the test never released the search"
        return getattr(self.inner, "search_numpy", self.inner.search)(q, k, **kw)

    search_numpy = search  # what LiveIndex calls when faiss.contrib.torch_utils has replaced search


@pytest.fixture(scope="module", params=["faiss", "faiss+torch_utils"], autouse=True)
def faiss_search(request):
    """Every test as faiss is, then every test again after faiss.contrib.torch_utils replaced Index.search with one
    that takes no ``params`` (pytorch-metric-learning's utils.inference imports it: any process that imports that
    gets the replacement, for good). Module scope: pytest runs all tests of the first variant first."""
    if request.param == "faiss+torch_utils":
        import faiss.contrib.torch_utils  # noqa: F401  (patches faiss's classes for the rest of the process)
    return request.param


def brute(live: dict[int, np.ndarray], q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, face ids) by numpy over {face id: unit vector}."""
    ids = np.fromiter(live, np.int64, len(live))
    s = q @ np.stack([live[i] for i in ids]).T
    order = np.argsort(-s, axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), ids[order]


def in_thread(fn, *args):
    out: dict = {}

    def run():
        out["result"] = fn(*args)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_a_write_completes_while_a_search_holds_the_index(kind):
    rng = np.random.default_rng(0)
    x = unit(rng.normal(size=(500, DIM)))
    index = LiveIndex(DIM, kind, vectors=x, ids=np.arange(500), merge_rows=10 ** 6, hidden_share=1.0)
    held = HeldSearch(index._parts[0])
    index._parts = (held,)
    search, result = in_thread(index.search, x[:1], 3)
    assert held.entered.wait(30)
    new = unit(rng.normal(size=(2, DIM)))
    writes, _ = in_thread(lambda: (index.add(np.array([900, 901]), new), index.remove(np.array([0]))))
    writes.join(30)  # returns at once unless the write waits for the held search (then the test fails below)
    assert not writes.is_alive(), "the write waited for the search in flight"
    assert search.is_alive()  # the search is still held: the write did not wait for it
    scores, found = index.search(new, 1)  # a new search sees the write (and does not wait for the held one)
    assert found[:, 0].tolist() == [900, 901] and scores[:, 0] == pytest.approx(1.0, abs=1e-5)
    assert 0 not in index.search(x[:1], 3)[1]
    held.release.set()
    search.join(30)
    assert result["result"][1][0, 0] == 0  # the held search answers from the index as it was when it started
    assert index.size == 501


def test_an_enrolment_completes_while_a_search_holds_the_store(tmp_path):
    rng = np.random.default_rng(1)
    db = open_database(str(tmp_path / "gallery.sqlite"), DIM)
    db.add_faces("ann", rng.normal(size=(3, DIM)), ["t"] * 3, "m")  # in the main index from the start
    store = GalleryStore(db, model="m")
    try:
        held = HeldSearch(store._index._parts[0])
        store._index._parts = (held,)
        search, result = in_thread(store.search, rng.normal(size=(1, DIM)), 1)
        assert held.entered.wait(30)
        bo = rng.normal(size=(1, DIM)).astype(np.float32)
        enrol, answer = in_thread(store.enroll, "bo", bo, ["t"])
        enrol.join(30)
        assert not enrol.is_alive() and search.is_alive(), "the enrolment waited for the search in flight"
        assert answer["result"][1] == 1 and store.search(bo, 1)[0][0]["identity"] == "bo"
        held.release.set()
        search.join(30)
        assert result["result"][0][0]["identity"] == "ann"
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_results_after_concurrent_writes_and_merges_equal_brute_force(kind):
    """Searchers and two writers at once, merges running in the background (every 40 faces): afterwards the index
    holds exactly the faces written and not removed, and answers as numpy does over them (ivf probes every cell,
    hnsw searches wide: both exact at this size, so any face lost or resurrected shows)."""
    rng = np.random.default_rng(2)
    x = unit(rng.normal(size=(800, DIM)))
    index = LiveIndex(DIM, kind, vectors=x, ids=np.arange(800), nprobe=4096, ef_search=512, merge_rows=40)
    live = dict(enumerate(x))
    lock, stop, errors = threading.Lock(), threading.Event(), []

    def writer(first: int, start: int, seed: int):
        r = np.random.default_rng(seed)
        mine = []
        for step in range(150):
            ids = np.arange(first + 2 * step, first + 2 * step + 2)
            v = unit(r.normal(size=(2, DIM)))
            with lock:  # the reference follows the same order as the index (the store's catch_up does too)
                index.add(ids, v)
                live.update(zip(ids.tolist(), v))
            mine += ids.tolist()
            if step % 3 == 0:
                gone = [mine.pop(int(r.integers(len(mine)))), start + step]  # one new face, one of the first 800
                with lock:
                    index.remove(np.array(gone))
                    for g in gone:
                        live.pop(g)

    def searcher():
        q = unit(rng.normal(size=(4, DIM)))
        while not stop.is_set():
            try:
                scores, found = index.search(q, 5)
                assert found.shape == (4, 5) and np.all(np.diff(scores, axis=1) <= 1e-6)
            except Exception as err:  # noqa: BLE001  reported below, in the test's thread
                errors.append(err)
                return

    searchers = [threading.Thread(target=searcher) for _ in range(3)]
    writers = [threading.Thread(target=writer, args=(10_000 * (w + 1), 400 * w, w)) for w in range(2)]
    for t in searchers + writers:
        t.start()
    for t in writers:
        t.join(120)
    stop.set()
    for t in searchers:
        t.join(60)
    index.wait_merged(60)
    assert not errors, errors
    assert index.merges > 0  # merges ran during the writes
    np.testing.assert_array_equal(index.face_ids(), np.sort(np.fromiter(live, np.int64)))
    assert index.size == len(live)
    q = unit(rng.normal(size=(20, DIM)))
    want_s, want_i = brute(live, q, 5)
    got_s, got_i = index.search(q, 5)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    index.merge(full=True)  # everything folded into one base, the removed faces left out: the same answers
    assert index.pending == (0, 0) and index.tails == 0
    np.testing.assert_array_equal(index.search(q, 5)[1], want_i)


def test_an_hnsw_rebuild_keeps_every_enrolment_made_during_it():
    """Removing past the hidden share rebuilds the HNSW graph in the background; enrolments and removals made
    while it runs (held on an Event) all stand afterwards, and the rebuilt graph holds no removed face."""
    rng = np.random.default_rng(3)
    x = unit(rng.normal(size=(1000, DIM)))
    index = LiveIndex(DIM, "hnsw", vectors=x, ids=np.arange(1000), ef_search=512, merge_rows=10 ** 6,
                      hidden_share=0.1)
    building, release = threading.Event(), threading.Event()
    rebuild = index._folded

    def held_rebuild(*args):
        building.set()
        assert release.wait(60), "the test never released the rebuild"
        return rebuild(*args)

    index._folded = held_rebuild
    live = dict(enumerate(x))
    early = unit(rng.normal(size=(5, DIM)))
    index.add(np.arange(2000, 2005), early)  # in the delta when the rebuild starts: it goes into the new graph
    live.update(zip(range(2000, 2005), early))
    index.remove(np.arange(101))  # past 10 %: the rebuild starts
    for i in range(101):
        live.pop(i)
    assert building.wait(30)
    during = unit(rng.normal(size=(30, DIM)))  # while the rebuild runs: none may be lost
    for j in range(30):
        index.add(np.array([3000 + j]), during[j:j + 1])
        live[3000 + j] = during[j]
    index.remove(np.array([2000, 3000, 500]))  # one from the old delta, one new, one of the old graph
    for i in (2000, 3000, 500):
        live.pop(i)
    assert index.merges == 0  # the writes above did not wait for the rebuild
    release.set()
    index.wait_merged(60)
    assert index.merges == 1
    np.testing.assert_array_equal(index.face_ids(), np.sort(np.fromiter(live, np.int64)))
    assert index.tails == 0 and index._parts[0].ntotal == 1000 - 101 + 5  # rebuilt without the faces removed
    # made during the rebuild: the 30 enrolments still in the delta, the 3 removals hidden over the new graph
    assert index.pending == (30, 3)
    _, found = index.search(during[1:], 1)
    assert found[:, 0].tolist() == list(range(3001, 3030))
    _, want = brute(live, x[200:220], 3)
    np.testing.assert_array_equal(index.search(x[200:220], 3)[1], want)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_a_merge_costs_the_delta_not_the_gallery(kind):
    """A merge turns the delta into a tail and leaves the base as it is (the same object: nothing copied); past
    MAX_TAILS tails the tails fold into one while they are a small share of the base, and everything folds into a
    new base once they are not. Answers equal numpy's all along."""
    rng = np.random.default_rng(4)
    x = unit(rng.normal(size=(2000, DIM)))
    index = LiveIndex(DIM, kind, vectors=x, ids=np.arange(2000), nprobe=4096, ef_search=512, merge_rows=10 ** 6)
    base = index._parts[0]
    live = dict(enumerate(x))
    q = unit(rng.normal(size=(10, DIM)))

    def enrol_and_merge(first: int, n: int):
        v = unit(rng.normal(size=(n, DIM)))
        index.add(np.arange(first, first + n), v)
        live.update(zip(range(first, first + n), v))
        assert index.merge()

    index.remove(np.array([5, 6]))
    for i in (5, 6):
        live.pop(i)
    for m in range(MAX_TAILS):
        enrol_and_merge(10_000 + 10 * m, 10)
        assert index._parts[0] is base and index.tails == m + 1
    np.testing.assert_array_equal(index.search(q, 5)[1], brute(live, q, 5)[1])
    enrol_and_merge(20_000, 10)  # one tail too many, 90 faces against 2,000: the tails fold into one
    assert index._parts[0] is base and index.tails == 1 and index._parts[1].ntotal == 90
    assert index.pending == (0, 2)  # the base still holds the two removed faces, hidden
    for m in range(MAX_TAILS):  # 90 + 8 x 60 = 570 faces in the tails: past a quarter of the base
        enrol_and_merge(30_000 + 100 * m, 60)
    assert index.tails == 0 and index._parts[0] is not base and index.folds == 1
    assert index._parts[0].ntotal == 2000 + 570 - (2 if kind != "hnsw" else 0)
    np.testing.assert_array_equal(index.face_ids(), np.sort(np.fromiter(live, np.int64)))
    got_s, got_i = index.search(q, 5)
    want_s, want_i = brute(live, q, 5)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    enrol_and_merge(40_000, 5)
    assert index.tails == 1 and index.merge(full=True) and index.tails == 0  # nothing pending: the tail still folds
    assert not index.merge(full=True) and not index.merge()  # nothing left to do
    np.testing.assert_array_equal(index.search(q, 5)[1], brute(live, q, 5)[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own niceness is Linux's")
def test_the_merger_runs_below_the_requests_priority():
    """The merger thread lowers its own CPU priority (the requests' threads keep theirs): a merge takes the cores
    the searches leave."""
    index = LiveIndex(DIM, "flat", merge_rows=4)
    seen = []
    part = index._part

    def spying_part(*args):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return part(*args)

    index._part = spying_part
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    index.add(np.arange(4), unit(np.eye(DIM)[:4]))  # a merge is due: the merger thread makes a tail
    index.wait_merged(30)
    assert seen == [min(mine + MERGE_NICENESS, 19)] and index.tails == 1
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
