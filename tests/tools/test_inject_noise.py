"""tools/inject_noise.py: known label noise in a copy of an ImageFolder, and scoring doctor findings against it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ..conftest import load_tool


def _tool():
    return load_tool("inject_noise")


def _image_folder(root: Path) -> Path:
    """30 identities of 2..8 tiny random JPEGs (ids 6, 13, 20, 27 have 8, so split has candidates)."""
    rng = np.random.default_rng(1)
    for i in range(30):
        (root / f"id{i:02d}").mkdir(parents=True)
        for j in range(2 + i % 7):
            pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"id{i:02d}" / f"p{j}.jpg")
    (root / "notes.txt").write_text("not an identity")
    return root


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


NOISE = ["--seed", "3", "--move", "0.1", "--copy", "3", "--split", "2", "--non-faces", "3"]


def test_inject_leaves_src_alone_and_its_truth_matches_dst(tmp_path, capsys):
    src = _image_folder(tmp_path / "src")
    before = _hashes(src)
    dst = tmp_path / "dst"
    truth = _tool().main(["inject", str(src), str(dst), "--truth", str(tmp_path / "truth.json"), *NOISE])
    assert len(capsys.readouterr().out.strip().splitlines()) == 4
    assert _hashes(src) == before
    assert json.loads((tmp_path / "truth.json").read_text()) == truth
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    originals = {k: v for k, v in before.items() if "/" in k}
    n = len(originals)
    assert (len(truth["split"]), len(truth["copied"]), len(truth["non_faces"])) == (2, 3, 3)
    assert len(truth["moved"]) == round(0.1 * n)
    assert truth["photos"] == n + 3 + 3 == len(_hashes(dst))

    split = {s["identity"] for s in truth["split"]}
    for s in truth["split"]:  # exactly the listed files, the first half stays (nothing else lands there)
        total = len(_files(src / s["identity"]))
        assert total >= 6 and s["second"] == s["identity"] + "_2"
        assert {f"{s['second']}/{f}" for f in _files(dst / s["second"])} == set(s["files"])
        assert len(s["files"]) == total // 2 and len(_files(dst / s["identity"])) == total - total // 2
    for m in truth["moved"]:
        assert m["from"] != m["to"] and m["from"] not in split and m["to"] not in split
        assert (dst / m["file"]).read_bytes() == (src / m["original"]).read_bytes()
        assert not (dst / m["original"]).exists() and len(_files(src / m["to"])) >= 2
        assert _files(dst / m["from"])  # never the last photo of its folder
        # The target keeps >= 2 own photos beside the one moved in (and a copy at most).
        assert len(_files(dst / m["to"]) & _files(src / m["to"])) >= 2
    targets = [m["to"] for m in truth["moved"]]
    assert len(set(targets)) == len(targets)  # enough targets here: one moved photo each
    moved = {m["original"] for m in truth["moved"]}
    for c in truth["copied"]:
        assert c["original"] not in moved and c["original"].split("/")[0] != c["copy"].split("/")[0]
        copy, original = (dst / c["copy"]).read_bytes(), (dst / c["original"]).read_bytes()
        assert copy == original == (src / c["original"]).read_bytes()
        assert len(_files(src / c["copy"].split("/")[0])) >= 2
    for nf in truth["non_faces"]:
        with Image.open(dst / nf["file"]) as im:
            assert (im.size, im.mode, im.format) == ((250, 250), "RGB", "JPEG")
        assert nf["file"].split("/")[0] not in split and nf["what"] not in ("astronaut", "camera")

    # Same seed, same truth (paths aside); a different seed, different noise.
    again = _tool().main(["inject", str(src), str(tmp_path / "dst2"), "--truth", str(tmp_path / "t2.json"), *NOISE])
    other = _tool().main(["inject", str(src), str(tmp_path / "dst3"), "--truth", str(tmp_path / "t3.json"),
                          *NOISE[2:]])
    strip = lambda t: {k: v for k, v in t.items() if k != "dst"}  # noqa: E731
    assert strip(again) == strip(truth) and strip(other) != strip(truth)

    with pytest.raises(SystemExit) as exc:
        _tool().main(["inject", str(src), str(dst), "--truth", str(tmp_path / "t4.json")])
    assert str(exc.value).startswith("inject_noise: ") and "\n" not in str(exc.value)


def test_identities_file_keeps_the_others_out(tmp_path, capsys):
    src = _image_folder(tmp_path / "src")
    (tmp_path / "keep.txt").write_text("id01\nid06\n\nid13\n")
    truth = _tool().main(["inject", str(src), str(tmp_path / "dst"), "--truth", str(tmp_path / "t.json"),
                          "--move", "0", "--copy", "0", "--split", "0", "--non-faces", "0",
                          "--identities", str(tmp_path / "keep.txt")])
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["id01", "id06", "id13"]
    assert truth["photos"] == 3 + 8 + 8
    (tmp_path / "bad.txt").write_text("id01\nnobody\n")
    with pytest.raises(SystemExit, match="nobody"):
        _tool().main(["inject", str(src), str(tmp_path / "dst2"), "--truth", str(tmp_path / "t2.json"),
                      "--identities", str(tmp_path / "bad.txt")])
    assert not (tmp_path / "dst2").exists()


def test_more_non_faces_than_pictures_are_crops_and_rotations(monkeypatch):
    tool = _tool()
    monkeypatch.setattr(tool, "PICTURES", ("checkerboard", "microaneurysms"))
    out = tool._non_faces(np.random.default_rng(0), 5)
    assert sorted(what for _, what in out[:2]) == ["checkerboard", "microaneurysms"]
    assert all(" crop " in what for _, what in out[2:])
    assert all(im.size == (250, 250) and im.mode == "RGB" for im, _ in out)


def test_score_precision_and_recall_per_kind(tmp_path, capsys):
    truth = {"moved": [{"file": f, "from": "X", "to": f[0]} for f in ("B/m1.jpg", "C/m2.jpg", "D/m3.jpg")],
             "copied": [{"original": "A/c1.jpg", "copy": "E/c1.jpg"}, {"original": "F/c2.jpg", "copy": "G/c2.jpg"}],
             "split": [{"identity": i, "second": f"{i}_2", "files": []} for i in ("P", "Q")],
             "non_faces": [{"file": f, "what": "coffee"} for f in ("K/nf0.jpg", "L/nf1.jpg", "M/nf2.jpg")]}
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    findings = [
        {"kind": "wrong_label", "suspects": ["B/m1.jpg"], "files": ["B/m1.jpg"]},  # right
        {"kind": "wrong_label", "suspects": ["B/b0.jpg"]},  # wrong
        {"kind": "wrong_label", "suspects": ["C/m2.jpg", "C/c0.jpg"]},  # right
        {"kind": "low_confidence", "suspects": ["D/m3.jpg"]},  # does not count for moved
        {"kind": "duplicate", "files": ["E/c1.jpg", "A/c1.jpg"], "suspects": ["E/c1.jpg"]},  # right
        {"kind": "duplicate", "files": ["F/c2.jpg", "G/c2.jpg"], "suspects": ["F/c2.jpg"]},  # wrong: the original
        {"kind": "near_duplicate", "files": ["F/c2.jpg", "H/h0.jpg"]},  # not scored (not injected)
        {"kind": "same_person", "identities": ["P", "P_2"]},  # right
        {"kind": "same_person", "identities": ["Q", "R"]},  # wrong
        {"kind": "same_person", "identities": ["Q_2", "Q"]},  # right
        {"kind": "no_face", "suspects": ["K/nf0.jpg"]},  # right
        {"kind": "no_face", "suspects": ["K/k0.jpg"]},  # wrong
        {"kind": "blurred", "suspects": ["L\\nf1.jpg"]},  # finds a non-face (recall), not scored for precision
        {"kind": "several_faces", "suspects": ["M/nf2.jpg"]},  # not a photo kind that counts
    ]
    (tmp_path / "f.jsonl").write_text("\n".join(json.dumps(f) for f in findings) + "\n\n")
    out = _tool().main(["score", str(tmp_path / "truth.json"), str(tmp_path / "f.jsonl"),
                        "--json", str(tmp_path / "s.json")])
    rows = out["rows"]
    expect = {"moved": (3, 3, 2, 2 / 3, 2 / 3, {"wrong_label": 2}),
              "copied": (2, 2, 1, 1 / 2, 1 / 2, {"duplicate": 1}),
              "split": (2, 3, 2, 2 / 3, 1.0, {"same_person": 2}),
              "non_faces": (3, 2, 1, 1 / 2, 2 / 3, {"blurred": 1, "no_face": 1})}
    for name, (injected, n, true, precision, recall, by) in expect.items():
        r = rows[name]
        assert (r["injected"], r["findings"], r["true_findings"], r["found_by"]) == (injected, n, true, by), name
        assert r["precision"] == pytest.approx(precision) and r["recall"] == pytest.approx(recall), name
    assert out["unscored"] == {"blurred": 1, "low_confidence": 1, "near_duplicate": 1, "several_faces": 1}
    assert json.loads((tmp_path / "s.json").read_text()) == out
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2].startswith("| moved | 3 | 3 | 2 | 0.667 | 0.667 |") and len(lines) == 2 + 4 + 2

    (tmp_path / "none.jsonl").write_text("")
    rows = _tool().main(["score", str(tmp_path / "truth.json"), str(tmp_path / "none.jsonl")])["rows"]
    assert all(r["precision"] is None and r["recall"] == 0.0 for r in rows.values())
    (tmp_path / "empty.json").write_text(json.dumps({k: [] for k in truth}))
    rows = _tool().main(["score", str(tmp_path / "empty.json"), str(tmp_path / "f.jsonl")])["rows"]
    assert rows["moved"]["recall"] is None and rows["moved"]["precision"] == 0.0
