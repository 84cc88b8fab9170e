"""The teacher pass where it cannot write beside the shards (training/teacher_pass.py's cache rule): shards at URLs
(moto's S3 server and the Range HTTP server, both on loopback: tests/conftest.py served_shards) and read-only
folders cache in $FACESIAM_CACHE/teacher-cache/, keyed by where the shards are; the next pass reuses that cache.
The teacher is the stand-in of distill_helpers (no dlib), which counts its calls."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from facesiam.training import teacher_pass
from tests.conftest import REPO, SUBPROCESS_TIMEOUT, served_shards
from tests.training.distill_helpers import FakeTeacher, targets
from tests.training.test_distill import expected

pytestmark = pytest.mark.timeout(300)  # a hung server fails its test


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """A private $FACESIAM_CACHE (remote metadata and teacher caches) per test, and short retry waits."""
    from facesiam.data import remote

    monkeypatch.setenv("FACESIAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(remote, "BACKOFF", 0.01)
    monkeypatch.setattr(teacher_pass, "CHUNK", 16)


@pytest.fixture
def shards(synthetic_shards, tmp_path):
    return shutil.copytree(synthetic_shards, tmp_path / "shards")


def _caches(tmp_path) -> list:
    folder = tmp_path / "cache" / teacher_pass.CACHE_DIR
    return sorted(folder.iterdir()) if folder.is_dir() else []


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_a_pass_over_remote_shards_caches_in_facesiam_cache_and_the_next_reuses_it(kind, shards, tmp_path, request):
    want_emb, want_found = expected(shards)
    with served_shards(kind, shards, request) as url:
        teacher = FakeTeacher()
        emb, found = targets(url, teacher, batch_size=5)
        assert teacher.prepared == len(want_found)  # every photo once
        np.testing.assert_array_equal(found, want_found)
        np.testing.assert_allclose(emb[found], want_emb[want_found], atol=1e-6)
        (cache,) = _caches(tmp_path)
        meta = json.loads((cache / "meta.json").read_text())
        assert meta["photos"] == len(want_found) and meta["found_by"]["none"] == int((~want_found).sum())
        assert not list(cache.glob("chunk-*")) and not (shards / teacher_pass.CACHE_DIR).exists()

        again = FakeTeacher()
        emb2, found2 = targets(url, again)
        assert again.prepared == 0 and again.embed_calls == 0  # read from the cache
        assert np.array_equal(emb2, emb) and np.array_equal(found2, found) and _caches(tmp_path) == [cache]


def test_two_locations_and_remade_shards_never_share_a_cache(shards, tmp_path, request):
    """The same bytes at another prefix get a cache of their own, and so do shards re-made at the same URL."""
    n = len(expected(shards)[1])
    with served_shards("s3", shards, request) as first, served_shards("s3", shards, request) as second:
        targets(first, FakeTeacher())
        other = FakeTeacher()
        targets(second, other)
        assert other.prepared == n and len(_caches(tmp_path)) == 2
    with served_shards("http", shards, request) as url:
        targets(url, FakeTeacher())
        meta = shards / "dataset.json"  # re-made shards: another dataset.json at the same URL
        meta.write_text(meta.read_text().replace('"options"', '"remade": 1, "options"', 1))
        remade = FakeTeacher()
        targets(url, remade)
        assert remade.prepared == n and len(_caches(tmp_path)) == 4


READ_ONLY_PASS = """
import sys
from facesiam.training import teacher_pass
from tests.training.distill_helpers import FakeTeacher, targets
teacher_pass.CHUNK = 16
for _ in range(2):  # the second pass finds the first one's cache
    teacher = FakeTeacher()
    targets(sys.argv[1], teacher)
    print(teacher.prepared)
"""


def test_read_only_local_shards_cache_in_facesiam_cache(shards, tmp_path):
    """A shard folder this process cannot write: chmod for a normal user; for root (whom permissions do not stop, as
    in CI) a read-only bind mount in a mount namespace of its own (unshare -m), so nothing outside the test sees it."""
    n = len(expected(shards)[1])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if os.geteuid() == 0:
        if not shutil.which("unshare"):
            pytest.skip("root, and no unshare for a read-only mount")
        mount = tmp_path / "read-only"
        mount.mkdir()
        command = ["unshare", "-m", "sh", "-c", 'mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" && shift 2 '
                   '&& exec "$@"', "sh", str(shards), str(mount), sys.executable, "-c", READ_ONLY_PASS, str(mount)]
    else:
        os.chmod(shards, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
        command = [sys.executable, "-c", READ_ONLY_PASS, str(shards)]
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    finally:
        os.chmod(shards, stat.S_IRWXU)
    if proc.returncode != 0 and "mount" in proc.stderr and os.geteuid() == 0:
        pytest.skip(f"no read-only bind mount here ({proc.stderr.strip()[-200:]})")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [str(n), "0"]  # every photo once, then the cache
    assert len(_caches(tmp_path)) == 1 and not (shards / teacher_pass.CACHE_DIR).exists()


def test_a_complete_cache_beside_shards_is_used_even_when_they_became_read_only(shards, tmp_path, monkeypatch):
    """Shards made and passed once, then mounted read-only: the cache beside them is still theirs."""
    emb, found = targets(shards, FakeTeacher())
    monkeypatch.setattr(teacher_pass, "_writable", lambda folder: False)  # as a read-only mount answers
    again = FakeTeacher()
    emb2, _ = targets(shards, again)
    assert again.prepared == 0 and np.array_equal(emb2, emb) and _caches(tmp_path) == []



def test_a_distillation_run_on_remote_shards_fills_the_cache_and_the_next_run_reuses_it(shards, tmp_path, request,
                                                                                        monkeypatch):
    """A distillation run's set-up (training/setup.py build_distillation, as train --data https://... --teacher
    calls it) reads the shards at the URL, caches in $FACESIAM_CACHE, and the next run's starts from that cache."""
    from types import SimpleNamespace

    import facesiam.faces.teachers as teachers
    from facesiam.config import config_from_dict
    from facesiam.data import ShardDataset
    from facesiam.training.setup import build_distillation

    made: list[FakeTeacher] = []
    monkeypatch.setattr(teachers, "build_teacher", lambda spec, **kwargs: made.append(FakeTeacher()) or made[-1])
    want_emb, want_found = expected(shards)
    with served_shards("http", shards, request) as url:
        cfg = config_from_dict({"data": url, "distill": {"teacher": "fake", "center_targets": False}})
        for run in range(2):
            data = SimpleNamespace(train=ShardDataset(url, "train"), val=None)
            got = build_distillation(cfg, None, data)  # no Accelerator: one process
            assert made[-1].prepared == (len(want_found) if run == 0 else 0)  # the second run: from the cache
            np.testing.assert_array_equal(got.train[1], want_found)
            np.testing.assert_allclose(got.train[0][want_found], want_emb[want_found], atol=1e-6)
    assert len(_caches(tmp_path)) == 1 and not (shards / teacher_pass.CACHE_DIR).exists()


def test_local_helper_processes_share_the_pass_and_give_what_one_process_gives(shards):
    """processes=2 (fit's teacher pass on both cores): this process embeds only its chunks, a helper process (given
    the teacher pickled) the others, and the joined cache equals the teacher's direct embedding of every photo."""
    want_emb, want_found = expected(shards)
    teacher = FakeTeacher()
    emb, found = teacher_pass.teacher_targets(shards, "train", teacher, source="shards", batch_size=5, processes=2)
    n = len(want_found)
    assert -(-n // teacher_pass.CHUNK) >= 2  # chunks to share
    mine = sum(min(teacher_pass.CHUNK, n - c * teacher_pass.CHUNK) for c in range(0, -(-n // teacher_pass.CHUNK), 2))
    assert teacher.prepared == mine < n  # the even chunks here, the odd ones in the helper
    np.testing.assert_array_equal(found, want_found)
    np.testing.assert_allclose(emb[found], want_emb[want_found], atol=1e-6)
    assert not list((shards / teacher_pass.CACHE_DIR).glob("*/chunk-*"))  # joined


def test_remade_shards_of_fewer_photos_carry_the_teachers_embeddings_over(synthetic_shards, shards, tmp_path):
    """fit --clean: shards re-made without some photos (the same held-out people) get the teacher's embeddings of
    their photos from the first shards' cache, row for row, with no second pass; a photo the first shards lack is a
    one-line error."""
    from facesiam.data import ShardDataset, write_shards
    from facesiam.errors import InputError

    faces = synthetic_shards.parent / "faces"
    train = ShardDataset(shards, "train")
    left_out = set(train.paths[::7])
    val = ShardDataset(shards, "val")
    fewer = tmp_path / "fewer"
    write_shards(faces, fewer, exclude=left_out, val_identities=sorted({val.classes[i] for i in val.labels}),
                 workers=1, progress=False)
    first = FakeTeacher()
    carried = teacher_pass.carry_over(shards, fewer, first, source="shards")
    assert first.prepared == len(train) + len(val)  # the first shards' pass, once
    assert carried == len(train) + len(val) - len(left_out)
    for split in ("train", "val"):
        again = FakeTeacher()
        emb, found = teacher_pass.teacher_targets(fewer, split, again, source="shards")
        assert again.prepared == 0  # carried, not computed
        want_emb, want_found = expected(fewer, split)
        np.testing.assert_array_equal(found, want_found)
        np.testing.assert_allclose(emb[found], want_emb[want_found], atol=1e-6)
    more = shutil.copytree(synthetic_shards, tmp_path / "more")  # no cache yet
    with pytest.raises(InputError, match=f"are not in {fewer}"):
        teacher_pass.carry_over(fewer, more, FakeTeacher(), source="shards")


def test_a_pass_killed_with_its_helper_running_leaves_no_helper_behind_and_resumes(shards, tmp_path):
    """SIGKILL of the process that started the helper (fit killed with kill -9): the helper ends with it instead of
    computing on beside the rerun and then waiting forever; the rerun completes the cache from the chunks left."""
    import psutil

    pids = tmp_path / "pids"
    pids.mkdir()
    log = tmp_path / "log"
    with log.open("w") as out:  # a file, not a pipe: a helper left behind would hold a pipe open, and run() with it
        proc = subprocess.run([sys.executable, "-m", "tests.training.distill_helpers", str(shards), "16", "2",
                               str(pids)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == -9, log.read_text()[-2000:]
    helpers = [int(p.name) for p in pids.iterdir() if int(p.name) != os.getpid()]
    assert len(helpers) == 2  # the killed process and its helper both embedded

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10  # the helper's own share would take ~4 s more if it went on
    while any(map(alive, helpers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in helpers if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "a helper outlived the killed pass"
    (cache,) = (shards / teacher_pass.CACHE_DIR).iterdir()
    assert not (cache / "meta.json").exists()

    teacher = FakeTeacher()
    emb, found = teacher_pass.teacher_targets(shards, "train", teacher, source="shards", processes=2)
    want_emb, want_found = expected(shards)
    np.testing.assert_array_equal(found, want_found)
    np.testing.assert_allclose(emb[found], want_emb[want_found], atol=1e-6)
