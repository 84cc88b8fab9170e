"""facesiam cluster end to end: folders of links to every photo (never moved), clusters.csv, and with --truth the
scores, checked against a brute-force count from the folders written. Real faces (LFW, where ../shared/data is
present; Huang et al. 2007) are clustered with dlib's descriptor."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from facesiam.commands.cluster import main as cluster

from ..conftest import shared_dataset
from ..curate.test_cluster import _brute_force
from .test_errors import _one_line_error


def _read_csv(out: Path) -> list[dict]:
    with open(out / "clusters.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_folders_links_and_scores(face_folder, tiny_model_dir, tmp_path):
    photos = shutil.copytree(face_folder, tmp_path / "photos")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in photos.rglob("*.png")}
    out = tmp_path / "people"
    summary = cluster([str(photos), "--checkpoint", str(tiny_model_dir), "--threshold", "0.9", "--out", str(out),
                       "--no-detect", "--truth", "parent", "--device", "cpu", "--no-progress", "--workers", "1"])
    rows = _read_csv(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p.relative_to(photos)) for p in before)
    for r in rows:
        link = out / r["folder"] / r["file"]
        assert link.is_symlink() and Path(os.readlink(link)) == (photos / r["path"]).resolve()
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in photos.rglob("*.png")} == before
    # the scores of the folders as written, counted pair by pair (each unsure photo alone)
    pred = [r["folder"] if r["folder"] != "unsure" else f"unsure-{k}" for k, r in enumerate(rows)]
    truth = [r["path"].split("/")[0] for r in rows]
    want = _brute_force(pred, truth)
    for key, value in want.items():
        assert summary["scores"][key] == pytest.approx(value), key
    assert (out / "report.html").is_file()


def test_without_a_threshold_is_one_line(face_folder, tiny_model_dir, tmp_path):
    message = _one_line_error(cluster, [str(face_folder), "--checkpoint", str(tiny_model_dir), "--out",
                                        str(tmp_path / "o"), "--no-detect"])
    assert "--report REPORT" in message and "--threshold" in message


@pytest.mark.timeout(600)
def test_real_faces_with_the_dlib_teacher(tmp_path):
    pytest.importorskip("dlib")
    lfw = shared_dataset("lfw-devtrain")
    photos = tmp_path / "photos"
    for name in ("Colin_Powell", "Tony_Blair", "Jean_Chretien", "Hugo_Chavez", "Ariel_Sharon", "Serena_Williams"):
        (photos / name).mkdir(parents=True)
        for src in sorted((lfw / name).iterdir())[:4]:
            shutil.copy(src, photos / name / src.name)
    summary = cluster([str(photos), "--teacher", "dlib", "--out", str(tmp_path / "people"), "--truth", "parent",
                       "--multi", "central", "--no-progress", "--workers", "1"])
    assert summary["scores"]["bcubed_f"] >= 0.9
