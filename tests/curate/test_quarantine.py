"""curate/quarantine.py and findings.jsonl: suspects move out (never deleted) and an undo restores the folder
byte for byte, empty folders included."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from facesiam.curate.findings import Finding, read_findings, suspects, write_findings
from facesiam.curate.quarantine import apply_quarantine, undo_quarantine
from facesiam.errors import InputError


def _tree(root: Path) -> dict:
    """Every file's bytes hash and every folder, relative to root."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out[rel + "/"] = None
        for f in files:
            out[os.path.join(rel, f)] = hashlib.sha256(Path(dirpath, f).read_bytes()).hexdigest()
    return out


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    for person, n in (("alice", 3), ("bob", 2), ("carol", 1)):
        (root / person).mkdir(parents=True)
        for k in range(n):
            (root / person / f"{k}.jpg").write_bytes(os.urandom(100 + k))
    return root


def test_apply_then_undo_restores_byte_for_byte(folder, tmp_path):
    before = _tree(folder)
    manifest, moved = apply_quarantine(["alice/1.jpg", "carol/0.jpg", "bob/gone.jpg"], folder, tmp_path / "q")
    assert moved == 2
    assert not (folder / "alice/1.jpg").exists() and not (folder / "carol").exists()  # emptied folder removed
    assert (tmp_path / "q/alice/1.jpg").is_file()
    record = json.loads(manifest.read_text())
    assert [m["file"] for m in record["moves"]] == ["alice/1.jpg", "carol/0.jpg"]
    assert record["removed_folders"] == ["carol"]
    assert undo_quarantine(manifest) == 2
    assert _tree(folder) == before
    assert undo_quarantine(manifest) == 0  # twice is harmless


def test_undo_leaves_a_file_whose_place_is_taken(folder, tmp_path):
    manifest, _ = apply_quarantine(["alice/0.jpg"], folder, tmp_path / "q")
    (folder / "alice/0.jpg").write_bytes(b"new")
    assert undo_quarantine(manifest) == 0
    assert (tmp_path / "q/alice/0.jpg").is_file() and (folder / "alice/0.jpg").read_bytes() == b"new"


def test_quarantine_inside_the_data_and_paths_outside_it_are_refused(folder):
    with pytest.raises(InputError, match="inside"):
        apply_quarantine(["alice/0.jpg"], folder, folder / "quarantine")
    with pytest.raises(InputError, match="not a path inside"):
        apply_quarantine(["../escape.jpg"], folder, folder.parent / "q")


def test_findings_round_trip_and_suspects(tmp_path):
    findings = [Finding("duplicate", ["a/1.jpg", "b/1.jpg"], ["a", "b"], 1.0, "quarantine", ["b/1.jpg"], ["a/1.jpg"]),
                Finding("several_faces", ["a/2.jpg"], ["a"], 2.0, "review"),
                Finding("wrong_label", ["b/1.jpg"], ["b", "a"], 0.4, "quarantine", ["b/1.jpg"]),
                Finding("no_face", ["c/x.png"], ["c"], 1.0, "quarantine", ["c/x.png"])]
    path = write_findings(tmp_path / "findings.jsonl", findings)
    again = read_findings(tmp_path)  # the report folder works too
    assert again == findings
    assert suspects(again) == ["b/1.jpg", "c/x.png"]
    assert suspects(again, {"no_face"}) == ["c/x.png"]
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(InputError, match=r"findings.jsonl:5: not a finding"):
        read_findings(path)
    with pytest.raises(InputError, match="unknown finding kind"):
        Finding("mystery", [], [], 0.0, "review")
