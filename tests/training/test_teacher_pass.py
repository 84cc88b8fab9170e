"""The teacher pass where it cannot write beside the shards (training/teacher_pass.py's cache rule): shards at URLs
(moto's S3 server and the Range HTTP server, both on loopback: tests/conftest.py served_shards) and read-only
folders cache in $FACESIAM_CACHE/teacher-cache/, keyed by where the shards are; the next pass reuses that cache.
The teacher is the stand-in of distill_helpers (no dlib), which counts its calls."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

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
