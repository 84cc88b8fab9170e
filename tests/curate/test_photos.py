"""curate/photos.py: a teacher's pass over a photo folder (the doctor's and the clustering's, when given the photos
rather than shards) on helper processes gives exactly what one process gives, keeping each photo's row, its
landmarks and the photos the teacher finds no face in. The teacher is the stand-in of tests/training (no dlib)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from facesiam.curate.photos import _embed_teacher
from tests.training.distill_helpers import FakeTeacher

pytestmark = pytest.mark.timeout(120)


def test_a_teachers_pass_on_helper_processes_equals_one_process(tmp_path):
    rng = np.random.default_rng(0)
    files, records = [], []
    for i in range(23):
        name = f"p{i % 4}/{i}.png"
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(tmp_path / name)
        files.append(name)
        records.append({"landmarks": rng.uniform(0, 32, (5, 2)).tolist()} if i % 3 else None)
    photos = SimpleNamespace(root=tmp_path, files=files, records=records)
    rows = np.array([i for i in range(23) if i != 7])  # photo 7 had no face for the detector: not embedded
    one_emb, one_found = _embed_teacher(FakeTeacher(), photos, rows, 4, False, processes=1)
    pids = tmp_path / "pids"
    pids.mkdir()
    emb, found = _embed_teacher(FakeTeacher(delay=0.2, pids=str(pids)), photos, rows, 4, False, processes=2)
    helpers = {int(p.name) for p in pids.iterdir()}
    assert len(helpers) == 2 and os.getpid() not in helpers  # both helpers embedded, this process did not
    np.testing.assert_array_equal(found, one_found)
    np.testing.assert_array_equal(emb, one_emb)
    assert 0 < found.sum() < len(rows)  # some photos without a face for the teacher: their rows stay zero
    assert not emb[~found].any()
    teacher = FakeTeacher()  # row q is photo rows[q], embedded on its own
    for q in (0, 7, 21):
        prepared = teacher.prepare(Image.open(tmp_path / files[rows[q]]))
        assert found[q] == (prepared.input is not None)
        if found[q]:
            np.testing.assert_allclose(emb[q], teacher.embed([prepared.input])[0], atol=1e-6)
