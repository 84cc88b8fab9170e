"""curate/checks.py on photos built by hand: every kind of injected problem is found with its files, and a clean
set gives no finding of that kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facesiam.curate.checks import CheckSettings, run_checks
from facesiam.curate.photos import Photos

DIM = 64


def _photos(inject: bool) -> Photos:
    """People p0..p4 with 5 photos each (p4's photos split into p4 and p4_again when ``inject``), plus, injected:
    a photo of p0 filed under p2, a byte copy of a p1 photo under p3, a near duplicate within p0, a photo with no
    face, one with two faces, one with a doubtful face and one blurred."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, DIM))
    files, idents, emb, records, sha, images = [], [], [], [], [], []

    def add(ident, person, name, *, record=None, digest=None, image=None, vector=None):
        files.append(f"{ident}/{name}.jpg")
        idents.append(ident)
        v = centres[person] + 0.25 * rng.normal(size=DIM) if vector is None else vector
        emb.append(v / np.linalg.norm(v))
        records.append(record or {"path": files[-1], "status": "aligned", "faces": 1, "score": 0.999, "skip": None})
        sha.append(digest or f"sha-{len(files)}")
        images.append(image or Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)))

    for person in range(5):
        for k in range(5):
            ident = f"p{person}_again" if inject and person == 4 and k >= 3 else f"p{person}"
            add(ident, person, f"{k}")
    if inject:
        add("p2", 0, "moved")
        add("p3", 1, "copy", digest=sha[5], vector=emb[5])
        add("p0", 0, "near", image=images[0].copy(), vector=emb[0] + 0.01 * rng.normal(size=DIM))
        add("p1", 1, "noface", record={"path": "p1/noface.jpg", "status": "skipped", "faces": 0, "score": None,
                                        "skip": "no_face", "reason": "no face found"})
        add("p2", 2, "two", record={"path": "p2/two.jpg", "status": "aligned", "faces": 2, "score": 0.999,
                                     "skip": None, "reason": "2 faces, kept the largest one"})
        add("p3", 3, "doubt", record={"path": "p3/doubt.jpg", "status": "aligned", "faces": 1, "score": 0.8,
                                       "skip": None})
        add("p3", 3, "soft")
    n = len(files)
    embedded = np.array([r["skip"] is None for r in records])
    e = np.asarray(emb, np.float32) * embedded[:, None]
    sharp = np.where(embedded, 500.0, np.nan)
    if inject:
        sharp[files.index("p3/soft.jpg")] = 20.0
    return Photos(Path("/nowhere"), files, idents, records, e, embedded, sharp, sha, lambda i: images[i],
                  crop_index=np.arange(n))


SETTINGS = CheckSettings(same_person=0.5, stranger=0.3, merge=0.8)


def _by_kind(findings):
    out = {}
    for f in findings:
        out.setdefault(f.kind, []).append(f)
    return out


def test_every_injected_problem_is_found_with_its_files():
    found = _by_kind(run_checks(_photos(inject=True), SETTINGS))
    assert [f.suspects for f in found["wrong_label"]] == [["p2/moved.jpg"]]
    assert found["wrong_label"][0].identities == ["p2", "p0"]  # filed under p2, looks like p0
    [dup] = found["duplicate"]
    assert sorted(dup.files) == ["p1/0.jpg", "p3/copy.jpg"] and dup.suspects == ["p3/copy.jpg"]
    [near] = found["near_duplicate"]
    assert sorted(near.files) == ["p0/0.jpg", "p0/near.jpg"] and len(near.suspects) == 1
    [merge] = found["same_person"]
    assert merge.identities == ["p4", "p4_again"] and merge.action == "merge"
    assert [f.files for f in found["no_face"]] == [["p1/noface.jpg"]]
    assert [f.files for f in found["several_faces"]] == [["p2/two.jpg"]]
    assert [f.files for f in found["low_confidence"]] == [["p3/doubt.jpg"]]
    assert [f.files for f in found["blurred"]] == [["p3/soft.jpg"]]


def test_a_clean_set_gives_no_findings():
    assert run_checks(_photos(inject=False), SETTINGS) == []


def test_similar_photos_with_different_pixels_are_not_near_duplicates():
    photos = _photos(inject=False)
    photos.embeddings[1] = photos.embeddings[0]  # same embedding, different (random) pictures: pHash far apart
    assert "near_duplicate" not in _by_kind(run_checks(photos, SETTINGS))


@pytest.mark.parametrize("merge", [0.8, 0.999])
def test_the_merge_threshold_decides_same_person(merge):
    found = _by_kind(run_checks(_photos(inject=True), CheckSettings(same_person=0.5, stranger=0.3, merge=merge)))
    assert ("same_person" in found) == (merge < 0.99)


def test_tail_threshold_sits_above_impostors_and_below_one_person():
    """Centre cosines of many impostor pairs (an exponential tail in -log(1 - cos)) plus a few pairs of one person:
    the extrapolated largest impostor separates them."""
    from facesiam.curate.checks import tail_threshold

    rng = np.random.default_rng(0)
    impostors = 1 - np.exp(-(1.0 + rng.exponential(0.25, 200_000)))  # 1 - cos ~ e^-1 * e^-Exp(0.25)
    same = np.array([0.995, 0.993, 0.99])
    t = tail_threshold(np.r_[impostors, same], pairs=200_003)
    assert impostors.max() < t < same.min()
    assert tail_threshold(impostors[:500], pairs=500) is None  # too few pairs to read a tail
