"""doctor and cluster on shards at URLs (moto's S3 server and the Range HTTP server on loopback: tests/conftest.py
served_shards) give what they give on the local copy of the same shards. A teacher on shards goes through the teacher
pass (training/teacher_pass.py): the doctor reuses a cache that a distillation filled, and fills one a distillation
then reuses. The teacher is the stand-in of tests/training/distill_helpers (no dlib), which counts its calls."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from facesiam.commands.cluster import main as cluster
from facesiam.commands.doctor import main as doctor
from facesiam.commands.make_shards import main as make_shards
from facesiam.data import ShardDataset
from facesiam.training import teacher_pass
from facesiam.training.teacher_pass import teacher_targets
from tests.conftest import served_shards
from tests.training.distill_helpers import FakeTeacher
from tests.training.test_distill import expected

pytestmark = pytest.mark.timeout(300)  # a hung server fails its test
MODEL = ["--threshold", "0.9", "--device", "cpu", "--no-progress", "--workers", "1"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """A private $FACESIAM_CACHE (remote metadata and teacher caches) per test, and short retry waits."""
    from facesiam.data import remote

    monkeypatch.setenv("FACESIAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(remote, "BACKOFF", 0.01)


@pytest.fixture
def noisy_shards(face_folder, tmp_path):
    """face_folder with a byte copy of one photo under another identity, as shards (2 identities held out). The
    photos are then deleted: they are only in the shards, as on a machine that reads the shards from a URL."""
    data = shutil.copytree(face_folder, tmp_path / "photos")
    ids = sorted(p.name for p in data.iterdir() if p.is_dir())
    original = sorted((data / ids[0]).iterdir())[0]
    shutil.copy(original, data / ids[1] / "copied.png")
    make_shards([str(data), str(tmp_path / "shards"), "--val-identities", "2", "--workers", "1", "--no-progress"])
    shutil.rmtree(data)
    return tmp_path / "shards", sorted([f"{ids[0]}/{original.name}", f"{ids[1]}/copied.png"])


@pytest.fixture
def fake_teachers(monkeypatch):
    """``--teacher fake`` builds a new stand-in teacher; the list holds every one built."""
    import facesiam.faces.teachers as teachers

    made: list[FakeTeacher] = []

    def build(spec, **kwargs):
        made.append(FakeTeacher())
        return made[-1]

    monkeypatch.setattr(teachers, "build_teacher", build)
    return made


def _findings(report) -> list[dict]:
    return [json.loads(line) for line in (report / "findings.jsonl").read_text().splitlines()]


def _without(summary: dict, *keys: str) -> dict:
    return {k: v for k, v in summary.items() if k not in keys + ("seconds",)}


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_doctor_on_remote_shards_finds_what_it_finds_locally(kind, noisy_shards, tiny_model_dir, tmp_path, request):
    shards, duplicate = noisy_shards
    local = doctor([str(shards), "--checkpoint", str(tiny_model_dir), "--out", str(tmp_path / "local"), *MODEL])
    with served_shards(kind, shards, request) as url:
        remote = doctor([url, "--checkpoint", str(tiny_model_dir), "--out", str(tmp_path / "remote"), *MODEL])
    assert remote["data"] == url and _without(remote, "data") == _without(local, "data")
    assert _findings(tmp_path / "remote") == _findings(tmp_path / "local")
    assert [sorted(f["files"]) for f in _findings(tmp_path / "remote") if f["kind"] == "duplicate"] == [duplicate]
    assert remote["photos"] == sum(len(ShardDataset(shards, s)) for s in ("train", "val"))


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_cluster_on_remote_shards_sorts_as_locally_and_writes_the_stored_images(kind, noisy_shards, tiny_model_dir,
                                                                                tmp_path, request):
    shards, _ = noisy_shards
    args = ["--checkpoint", str(tiny_model_dir), "--truth", "parent", *MODEL]
    local = cluster([str(shards), "--out", str(tmp_path / "local"), *args])
    with served_shards(kind, shards, request) as url:
        remote = cluster([url, "--out", str(tmp_path / "remote"), *args])
    assert _without(remote, "photos") == _without(local, "photos") and remote["photos"] == url

    def rows(out):
        with open(out / "clusters.csv", newline="") as f:
            return list(csv.DictReader(f))

    assert rows(tmp_path / "remote") == rows(tmp_path / "local")
    stored = {}  # every photo's bytes in the shards, read locally
    for split in ("train", "val"):
        ds = ShardDataset(shards, split)
        stored.update({path: ds.read_bytes(i) for i, path in enumerate(ds.paths)})
    assert remote["from_shards"] == len(stored) == len(rows(tmp_path / "remote"))  # the photos are not here
    for row in rows(tmp_path / "remote"):
        assert (tmp_path / "remote" / row["folder"] / row["file"]).read_bytes() == stored[row["path"]]


def test_the_doctor_reuses_a_distillations_teacher_cache_and_fills_one_it_reuses(noisy_shards, fake_teachers,
                                                                                  tmp_path):
    shards, duplicate = noisy_shards
    found = {split: expected(shards, split)[1] for split in ("train", "val")}  # the teacher, photo by photo
    args = ["--teacher", "fake", "--threshold", "0.9", "--no-progress", "--workers", "1"]

    filled = doctor([str(shards), *args, "--out", str(tmp_path / "filled")])  # no cache yet: the doctor fills it
    assert fake_teachers[-1].prepared == sum(len(f) for f in found.values())
    assert filled["embedded"] == sum(int(f.sum()) for f in found.values())
    for split in ("train", "val"):  # a distillation run now finds the doctor's cache
        distillation = FakeTeacher()
        teacher_targets(shards, split, distillation)
        assert distillation.prepared == 0

    shutil.rmtree(shards / teacher_pass.CACHE_DIR)
    for split in ("train", "val"):  # a distillation run fills the cache; the doctor reuses it
        teacher_targets(shards, split, FakeTeacher(), source="shards")
    reused = doctor([str(shards), *args, "--out", str(tmp_path / "reused")])
    assert fake_teachers[-1].prepared == 0 and fake_teachers[-1].embed_calls == 0
    assert _without(reused, "data") == _without(filled, "data")
    assert _findings(tmp_path / "reused") == _findings(tmp_path / "filled")
    assert [sorted(f["files"]) for f in _findings(tmp_path / "reused") if f["kind"] == "duplicate"] == [duplicate]


def test_the_doctor_with_a_teacher_on_remote_shards_caches_in_facesiam_cache(noisy_shards, fake_teachers, tmp_path,
                                                                             request):
    shards, _ = noisy_shards
    args = ["--teacher", "fake", "--threshold", "0.9", "--no-progress", "--workers", "1"]
    local = doctor([str(shards), *args, "--out", str(tmp_path / "local")])
    with served_shards("s3", shards, request) as url:
        first = doctor([url, *args, "--out", str(tmp_path / "first")])
        assert fake_teachers[-1].prepared == local["photos"]  # every photo once (the shared cache was empty)
        caches = sorted((tmp_path / "cache" / teacher_pass.CACHE_DIR).iterdir())
        assert [c.name.split("-")[2] for c in caches] == ["train", "val"]
        second = doctor([url, *args, "--out", str(tmp_path / "second")])
        assert fake_teachers[-1].prepared == 0  # from $FACESIAM_CACHE
    for summary, report in ((first, "first"), (second, "second")):
        assert _without(summary, "data") == _without(local, "data")
        assert _findings(tmp_path / report) == _findings(tmp_path / "local")
    assert sorted((tmp_path / "cache" / teacher_pass.CACHE_DIR).iterdir()) == caches  # no new one
