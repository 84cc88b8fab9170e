"""facesiam doctor end to end: findings with their files, quarantine + undo byte for byte, make-shards --exclude,
and bad input in one line. Real faces: the astronaut photo (scikit-image; NASA, public domain) and, where
../shared/data is present, LFW (Huang et al. 2007) examined with dlib's descriptor."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from facesiam.commands.doctor import main as doctor
from facesiam.commands.make_shards import main as make_shards

from ..conftest import photo, shared_dataset
from .test_errors import _one_line_error


def _tree(root: Path) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out[rel + "/"] = None
        out.update({os.path.join(rel, f): hashlib.sha256(Path(dirpath, f).read_bytes()).hexdigest() for f in files})
    return out


def _findings(report: Path) -> list[dict]:
    return [json.loads(line) for line in (report / "findings.jsonl").read_text().splitlines()]


@pytest.fixture
def noisy_folder(face_folder, tmp_path):
    """The synthetic faces with a byte copy of one photo under another identity and a file that is no image."""
    data = shutil.copytree(face_folder, tmp_path / "data")
    ids = sorted(p.name for p in data.iterdir() if p.is_dir())
    original = sorted((data / ids[0]).iterdir())[0]
    shutil.copy(original, data / ids[1] / "copied.png")
    (data / ids[2] / "broken.png").write_bytes(b"\x89PNG not really")
    return data, f"{ids[0]}/{original.name}", f"{ids[1]}/copied.png", f"{ids[2]}/broken.png"


def test_findings_quarantine_undo_and_exclude(noisy_folder, tiny_model_dir, tmp_path):
    data, original, copy, broken = noisy_folder
    before = _tree(data)
    report = tmp_path / "report"
    summary = doctor([str(data), "--checkpoint", str(tiny_model_dir), "--out", str(report), "--no-detect",
                      "--threshold", "0.9", "--device", "cpu", "--no-progress", "--workers", "1"])
    found = _findings(report)
    [dup] = [f for f in found if f["kind"] == "duplicate"]
    assert sorted(dup["files"]) == sorted([original, copy]) and len(dup["suspects"]) == 1
    assert [f["files"] for f in found if f["kind"] == "unreadable"] == [[broken]]
    assert summary["counts"]["unreadable"] == 1 and (report / "report.html").is_file()
    page = (report / "report.html").read_text()
    assert "duplicate: 1" in page and all((report / t).is_file() for t in
                                           [s.split("'")[1] for s in page.split("<img src=")[1:]])
    assert _tree(data) == before  # examining changes nothing

    quarantine = tmp_path / "quarantine"
    result = doctor([str(data), "--findings", str(report), "--apply", "quarantine", str(quarantine)])
    moved = {dup["suspects"][0], broken}
    assert result["quarantine"]["moved"] == len(moved)
    assert not any((data / m).exists() for m in moved) and all((quarantine / m).is_file() for m in moved)
    doctor(["--undo", result["quarantine"]["manifest"]])
    assert _tree(data) == before

    meta = make_shards([str(data), str(tmp_path / "shards"), "--exclude", str(report / "findings.jsonl"),
                        "--workers", "1", "--no-progress"])
    assert meta["options"]["excluded"] == len(moved)
    index = np.load(tmp_path / "shards" / "index" / "train.npz")
    assert meta["num_samples"] == sum(1 for k in before if k.endswith(".png")) - len(moved)
    assert index is not None


def test_bad_input_is_one_line(face_folder, tiny_model_dir, aligned_model, tmp_path):
    base = ["--checkpoint", str(tiny_model_dir), "--out", str(tmp_path / "r"), "--no-detect", "--threshold", "0.5"]
    message = _one_line_error(doctor, [str(tmp_path / "nowhere")] + base)
    assert "is not a folder" in message
    data = shutil.copytree(face_folder, tmp_path / "data")
    message = _one_line_error(doctor, [str(data), "--checkpoint", str(tiny_model_dir), "--out", str(data / "report"),
                                       "--no-detect", "--threshold", "0.5"])
    assert "inside the source" in message  # its thumbnails would become an identity of DATA
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    message = _one_line_error(doctor, [str(data), "--checkpoint", str(tiny_model_dir), "--out", str(tmp_path / "taken"),
                                       "--no-detect", "--threshold", "0.5", "--overwrite"])
    assert "holds no doctor.json" in message and (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    (data / "empty_person").mkdir()
    message = _one_line_error(doctor, [str(data)] + base)
    assert "empty_person holds no photos" in message and "remove it" in message
    aligned = tmp_path / "aligned"  # an aligned folder (alignment.json) and a model trained on other crops
    aligned.mkdir()
    record = json.loads(json.dumps({"format": "facesiam-aligned", "version": 1, "source": str(face_folder),
                                    "alignment": {"size": 160, "multi": "largest", "detector": {"name": "MTCNN"},
                                                  "template": {"name": "arcface"}}, "images": []}))
    (aligned / "alignment.json").write_text(json.dumps(record))
    message = _one_line_error(doctor, [str(aligned), "--checkpoint", str(aligned_model), "--out", str(tmp_path / "r"),
                                       "--threshold", "0.5"])
    assert "aligned differently from the model's training faces (size 160 vs 112" in message
    message = _one_line_error(doctor, [str(aligned)] + base)
    assert "trained on unaligned images" in message


def test_raw_photos_are_aligned_as_trained_and_a_photo_without_a_face_is_found(aligned_model, tmp_path):
    data = tmp_path / "photos"
    for person, tint in (("ann", (90, 120, 150)), ("bea", (150, 120, 90))):
        (data / person).mkdir(parents=True)
        for k, (scale, degrees) in enumerate([(0.8, 0), (0.7, 8)]):
            photo(scale, degrees, (40 + 20 * k, 30), tint).save(data / person / f"{k}.jpg")
    Image.fromarray(skimage.data.coffee()).save(data / "bea" / "coffee.jpg")  # a cup of coffee: no face
    report = tmp_path / "report"
    summary = doctor([str(data), "--checkpoint", str(aligned_model), "--out", str(report), "--threshold", "0.5",
                      "--device", "cpu", "--no-progress", "--workers", "1"])
    assert [f["files"] for f in _findings(report) if f["kind"] == "no_face"] == [["bea/coffee.jpg"]]
    assert summary["embedded"] == 4 and summary["photos"] == 5


@pytest.mark.timeout(600)
def test_real_faces_with_the_dlib_teacher(tmp_path):
    """LFW people with a photo moved to another person, a byte copy and a non-face: each is found, with its files."""
    pytest.importorskip("dlib")
    lfw = shared_dataset("lfw-devtrain")
    people = ["Colin_Powell", "Tony_Blair", "Jean_Chretien", "Hugo_Chavez", "Ariel_Sharon"]
    data = tmp_path / "data"
    for name in people:
        (data / name).mkdir(parents=True)
        for src in sorted((lfw / name).iterdir())[:4]:
            shutil.copy(src, data / name / src.name)
    moved = sorted((lfw / "Junichiro_Koizumi").iterdir())[0]
    shutil.copy(moved, data / "Tony_Blair" / moved.name)
    copied = sorted((data / "Hugo_Chavez").iterdir())[0]
    shutil.copy(copied, data / "Ariel_Sharon" / copied.name)
    Image.fromarray(skimage.data.rocket()).save(data / "Colin_Powell" / "rocket.jpg")
    report = tmp_path / "report"
    doctor([str(data), "--teacher", "dlib", "--out", str(report), "--multi", "central", "--no-progress",
            "--workers", "1"])
    found = _findings(report)
    kinds = {f["kind"]: f for f in found}
    assert kinds["wrong_label"]["suspects"] == [f"Tony_Blair/{moved.name}"]
    assert kinds["duplicate"]["suspects"] == [f"Ariel_Sharon/{copied.name}"]
    assert kinds["no_face"]["files"] == ["Colin_Powell/rocket.jpg"]
    assert not [f for f in found if f["kind"] in ("wrong_label", "same_person")
                and f["suspects"] != [f"Tony_Blair/{moved.name}"]]


def test_shards_are_examined_by_their_source_paths(noisy_folder, tiny_model_dir, tmp_path):
    data, original, copy, _ = noisy_folder
    make_shards([str(data), str(tmp_path / "shards"), "--val-identities", "2", "--workers", "1", "--no-progress"])
    report = tmp_path / "report"
    summary = doctor([str(tmp_path / "shards"), "--checkpoint", str(tiny_model_dir), "--out", str(report),
                      "--threshold", "0.9", "--device", "cpu", "--no-progress"])
    [dup] = [f for f in _findings(report) if f["kind"] == "duplicate"]
    assert sorted(dup["files"]) == sorted([original, copy])
    assert summary["photos"] == sum(1 for p in data.rglob("*.png")) - 1  # the broken file was never packed


def test_an_onnx_export_finds_what_the_checkpoint_finds(noisy_folder, tiny_model_dir, tmp_path):
    from facesiam.export import export_onnx

    data, *_ = noisy_folder
    export_onnx(tiny_model_dir, tmp_path / "m.onnx", check=False)
    args = ["--no-detect", "--threshold", "0.9", "--no-progress", "--workers", "1"]
    doctor([str(data), "--checkpoint", str(tiny_model_dir), "--device", "cpu", "--out", str(tmp_path / "t")] + args)
    doctor([str(data), "--onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "o")] + args)
    key = lambda f: (f["kind"], f["files"], f["suspects"])  # noqa: E731
    assert sorted(map(key, _findings(tmp_path / "o"))) == sorted(map(key, _findings(tmp_path / "t")))
