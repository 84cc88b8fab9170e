"""IJB-B/IJB-C evaluation on a generated IJB-like folder: layout, alignment + mirror, pooling, 1:1 and 1:N metrics
(expected values computed here with NumPy/scikit-learn from the protocol's description), bad rows, resume."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from sklearn.metrics import roc_curve

from facesiam.errors import InputError
from facesiam.eval import ijb
from facesiam.faces.template import ARCFACE_TEMPLATE_112

SUBJECTS, TEMPLATES_PER_SUBJECT, DIM, NOISE = 24, 3, 16, 2.5
# Each photo: a grey field with a disc of one colour on the face's left eye and one of another colour on its right
# eye, the face scaled by SCALE, centred at FACE (off the photo's centre) and turned by 20-45 degrees either way:
# only an alignment by the 5 landmarks puts the two discs where the stub reads them (the template's eyes).
SCALE, FACE, CANVAS, RADIUS, GREY = 1.25, np.array([95.0, 115.0]), 220, 14, 13  # GREY: (128, 128, 128)
PALETTE = np.array(list(itertools.product((0, 128, 255), repeat=3)), np.float64)


class Stop(Exception):
    """Stands for a run killed half way."""


class Stub(torch.nn.Module):
    """A 'network' the test controls: it reads the colours at the template's two eyes in an aligned crop (only a
    correct alignment puts the photo's eye discs there) and returns the vector the test chose for that ordered
    pair. A mirrored crop shows the pair reversed, so it gets its own vector. An all-black crop (an unusable one)
    gets zeros, anything else is a KeyError. Counts its calls; after ``stop_after`` calls, it fails."""

    def __init__(self, table: dict, stop_after: int | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # the embedding loop finds the device from a parameter
        self.table, self.stop_after, self.calls = table, stop_after, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.stop_after is not None and self.calls > self.stop_after:
            raise Stop
        assert images.shape[1:] == (3, 112, 112)
        out = []
        for x in images.permute(0, 2, 3, 1).numpy().astype(np.float64) * 255:
            left, right = (int(np.argmin(((PALETTE - x[47:57, c].reshape(-1, 3).mean(0)) ** 2).sum(1)))
                           for c in (slice(33, 43), slice(69, 79)))  # the template's eyes: x 38.3 and 73.5
            out.append(np.zeros(DIM) if (left, right) == (0, 0) else self.table[(left, right)])  # (0, 0): blank
        return torch.tensor(np.array(out), dtype=torch.float32)


def to_tensor(picture: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(picture, np.float32) / 255).permute(2, 0, 1)


def run(root: Path, stub: Stub, out: Path, **options) -> dict:
    return ijb.evaluate_ijb(root, stub, to_tensor, out, **{"model_id": "stub", "alignment": {"size": 112},
                                                           "progress": False, **options})


def make_ijb(root: Path, name: str = "ijbc", seed: int = 0, drop: tuple = ()) -> dict:
    """An IJB-like folder: SUBJECTS x TEMPLATES_PER_SUBJECT templates of 2 media (a photo; a 'video' of 2 frames),
    every template pair, galleries of the first template of the first half of the subjects (G1) and of the second
    half (G2), the other templates mixed probes.
    Returns what the test needs to compute the expected results (``drop``: image names written nowhere)."""
    rng = np.random.default_rng(seed)
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    centers = rng.normal(size=(SUBJECTS, DIM))
    codes = iter([(a, b) for a in range(len(PALETTE)) for b in range(a + 1, len(PALETTE)) if GREY not in (a, b)])
    table, images, faces, templates = {}, {}, [], {}
    media_id = 500
    for s in range(SUBJECTS):
        for j in range(TEMPLATES_PER_SUBJECT):
            tid = 1000 + 37 * s + 3 * j  # ids neither contiguous nor sorted by subject
            templates[tid] = s
            for frames in (1, 2):
                media_id += 1
                for _ in range(frames):
                    a, b = next(codes)
                    image = f"{len(images) + 1}.png"
                    for key in ((a, b), (b, a)):  # the crop's vector and its mirror image's
                        v = centers[s] + NOISE * rng.normal(size=DIM)
                        table[key] = v / np.linalg.norm(v)
                    images[image] = {"code": (a, b), "score": float(rng.uniform(0.3, 1.0)), "subject": s,
                                     "degrees": float(rng.choice([-1, 1]) * rng.uniform(20, 45))}
                    faces.append((image, tid, media_id))
    centre = ARCFACE_TEMPLATE_112.mean(0)
    upright = (ARCFACE_TEMPLATE_112 - centre) * SCALE + FACE  # the landmarks before the turn
    lines = []
    for image, info in images.items():
        if image in drop:
            continue
        t = np.radians(info["degrees"])
        turned = (upright - FACE) @ np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) + FACE
        photo = Image.new("RGB", (CANVAS, CANVAS), tuple(PALETTE[GREY].astype(int)))
        draw = ImageDraw.Draw(photo)
        for (x, y), colour in zip(turned[:2], info["code"]):
            draw.ellipse([x - RADIUS, y - RADIUS, x + RADIUS, y + RADIUS], fill=tuple(PALETTE[colour].astype(int)))
        photo.save(root / "loose_crop" / image)
        lines.append(f"{image} " + " ".join(f"{v:.3f}" for v in turned.ravel()) + f" {info['score']:.6f}")
    (root / "meta" / f"{name}_name_5pts_score.txt").write_text("\n".join(lines) + "\n")
    (root / "meta" / f"{name}_face_tid_mid.txt").write_text(
        "".join(f"{i} {t} {m}\n" for i, t, m in faces if i not in drop))
    tids = sorted(templates)
    pairs = [(t1, t2, int(templates[t1] == templates[t2])) for t1, t2 in itertools.combinations(tids, 2)]
    (root / "meta" / f"{name}_template_pair_label.txt").write_text("".join(f"{a} {b} {c}\n" for a, b, c in pairs))
    first = {s: 1000 + 37 * s for s in range(SUBJECTS)}  # each subject's first template
    names = ("G1", "G2") if name == "ijbc" else ("S1", "S2")  # IJB-B calls its galleries S1 and S2
    half = SUBJECTS // 2
    gallery = {names[0]: [first[s] for s in range(half)], names[1]: [first[s] for s in range(half, SUBJECTS)]}
    probes = [t for t in tids if t not in first.values()]
    for fname, chosen in [(f"1N_gallery_{g}.csv", ts) for g, ts in gallery.items()] + [("1N_probe_mixed.csv", probes)]:
        rows = ["TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID"]
        rows += [f"{t},{templates[t]},img/{i},{k}" for t in chosen for k, (i, tt, _) in enumerate(faces) if tt == t]
        (root / "meta" / f"{name}_{fname}").write_text("\n".join(rows) + "\n")
    return {"table": table, "images": images, "faces": faces, "templates": templates, "pairs": pairs,
            "galleries": list(gallery.values()), "probes": probes}


# ------------------------------------------------------------------------------------ the expected results, by hand

def expected_templates(gen: dict, drop: tuple = ()) -> dict:
    """Template features as the protocol describes them, with plain loops: (crop + mirror) x faceness, mean per
    media, sum per template, normalised."""
    table = gen["table"]
    feature = {i: (table[info["code"]] + table[info["code"][::-1]]) * info["score"]
               for i, info in gen["images"].items() if i not in drop}
    out = {}
    for tid in gen["templates"]:
        media = {}
        for image, t, m in gen["faces"]:
            if t == tid and image in feature:
                media.setdefault(m, []).append(feature[image])
        if media:
            total = sum(np.mean(v, axis=0) for v in media.values())
            out[tid] = total / np.linalg.norm(total)
    return out


def expected_tar(scores: np.ndarray, same: np.ndarray) -> dict:
    """TAR at each FAR target: the largest TPR over sklearn's ROC points with FPR <= target (None with fewer than
    1/FAR impostor pairs)."""
    fpr, tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    n_imp = int((~same).sum())
    return {f"{t:.0e}": (None if n_imp * t < 1 else float(tpr[fpr <= t].max())) for t in
            (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)}


def expected_1n(feats: dict, templates: dict, gallery: list, probes: list) -> dict:
    """Brute force: rank of each mated probe; the smallest threshold with FPIR <= target over every candidate."""
    g = np.array([feats[t] for t in gallery])
    g_subj = np.array([templates[t] for t in gallery])
    rank, own, best_non = [], [], []
    for t in probes:
        s = g @ feats[t]
        if templates[t] in g_subj:
            mine = s[g_subj == templates[t]].max()
            rank.append(1 + int(np.sum(s[g_subj != templates[t]] > mine)))
            own.append(mine)
        else:
            best_non.append(s.max())
    rank, own, best_non = np.array(rank), np.array(own), np.array(best_non)
    out = {f"rank{r}": float(np.mean(rank <= r)) for r in (1, 5, 10)}
    for target in (1e-2, 1e-1):
        key = f"{target:.0e}"
        if len(best_non) * target < 1:
            out[key] = None
            continue
        candidates = np.sort(np.r_[best_non, np.nextafter(best_non, np.inf), own, np.inf])
        th = next(c for c in candidates if np.mean(best_non >= c) <= target)
        out[key] = float(np.mean((rank == 1) & (own >= th)))
    return out


# ------------------------------------------------------------------------------------------------------ the tests

@pytest.fixture(scope="module")
def ijbc(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb") / "IJBC"
    return root, make_ijb(root)


def test_layout_is_read_and_the_name_detected(ijbc, tmp_path):
    root, gen = ijbc
    layout = ijb.read_ijb(root)
    assert layout.name == "ijbc" and layout.title == "IJB-C" and not layout.problems
    assert len(layout.images) == len(gen["images"]) and len(layout.face_image) == len(gen["faces"])
    assert len(layout.pair_t1) == len(gen["pairs"]) and set(layout.galleries) == {"G1", "G2"}
    assert sorted(layout.probes[0].tolist()) == sorted(gen["probes"])
    both = tmp_path / "both"
    make_ijb(both)
    (both / "meta" / "ijbb_face_tid_mid.txt").write_text("1.png 1 1\n")
    with pytest.raises(InputError, match="both ijbc_ and ijbb_"):
        ijb.read_ijb(both)
    with pytest.raises(InputError, match="no meta/ijbc_face_tid_mid.txt"):
        ijb.read_ijb(tmp_path)


def test_pooling_matches_a_hand_computation():
    rng = np.random.default_rng(3)
    feats, weights = rng.normal(size=(6, 4)), rng.uniform(0.2, 1, 6)
    face_image = np.array([0, 1, 2, 3, 4, 5, 2])       # image 2 in two templates
    face_template = np.array([7, 7, 7, 9, 9, 9, 9])
    face_media = np.array([1, 1, 2, 3, 4, 4, 4])
    usable = np.array([True, True, True, True, True, False])
    templates, pooled = ijb.pool_templates(feats, weights, face_image, face_template, face_media, usable)
    w = feats * weights[:, None]
    t7 = (w[0] + w[1]) / 2 + w[2]
    t9 = w[3] + (w[4] + w[2]) / 2                      # image 5 is unusable: media 4 is the mean of images 4 and 2
    assert templates.tolist() == [7, 9]
    np.testing.assert_allclose(pooled, [t7 / np.linalg.norm(t7), t9 / np.linalg.norm(t9)], rtol=1e-12)


def test_metrics_match_an_independent_computation(ijbc, tmp_path):
    root, gen = ijbc
    result = run(root, Stub(gen["table"]), tmp_path / "out")
    feats = expected_templates(gen)
    assert result["n_templates"] == len(feats) and result["n_images_unusable"] == 0
    scores = np.array([feats[a] @ feats[b] for a, b, _ in gen["pairs"]])
    same = np.array([c for *_, c in gen["pairs"]]) == 1
    saved = np.load(tmp_path / "out" / "ijbc_pair_scores.npz")
    np.testing.assert_allclose(saved["score"], scores, atol=1e-6)
    v = result["verification"]
    assert (v["n_genuine"], v["n_impostor"]) == (int(same.sum()), int((~same).sum()))
    want = expected_tar(scores, same)
    assert want["1e-03"] is not None and want["1e-04"] is None and 0 < want["1e-02"] < 1
    for key, tar in want.items():
        assert v["tar_at_far"][key] == (None if tar is None else pytest.approx(tar)), key
    for gname, gallery in zip(("G1", "G2"), gen["galleries"]):
        want = expected_1n(feats, gen["templates"], gallery, gen["probes"])
        got = result["identification"][gname]
        for r in (1, 5, 10):
            assert got[f"rank{r}"] == pytest.approx(want[f"rank{r}"]), (gname, r)
        assert 0 < want["1e-01"] < 1 and want["1e-02"] is None and 0 < want["rank1"] < want["rank10"]
        for key in ("1e-01", "1e-02"):
            assert got["tpir_at_fpir"][key] == (None if want[key] is None else pytest.approx(want[key])), (gname, key)
    g1, g2 = result["identification"]["G1"], result["identification"]["G2"]
    assert result["identification"]["mean"]["rank1"] == pytest.approx((g1["rank1"] + g2["rank1"]) / 2)


def test_the_mirror_image_and_the_faceness_score_count(ijbc, tmp_path):
    """Change only the mirror images' vectors, or only one score: the template features follow."""
    root, gen = ijbc
    layout = ijb.read_ijb(root)
    base, _, _ = ijb.embed_crops(layout, Stub(gen["table"]), to_tensor, tmp_path / "a", progress=False)
    mirrored = {k: (v if k[0] < k[1] else -v) for k, v in gen["table"].items()}
    other, _, _ = ijb.embed_crops(layout, Stub(mirrored), to_tensor, tmp_path / "b", progress=False)
    code = gen["images"][layout.images[0]]["code"]
    np.testing.assert_allclose(base[0], gen["table"][code] + gen["table"][code[::-1]], atol=1e-6)
    np.testing.assert_allclose(other[0], gen["table"][code] - gen["table"][code[::-1]], atol=1e-6)


def test_ijbb_names_are_recognised(tmp_path):
    gen = make_ijb(tmp_path / "IJBB", name="ijbb")
    result = run(tmp_path / "IJBB", Stub(gen["table"]), tmp_path / "out")
    assert result["dataset"] == "IJB-B" and set(result["identification"]) == {"G1", "G2", "mean"}
    assert (tmp_path / "out" / "ijbb_pair_scores.npz").is_file()


def test_bad_rows_are_left_out_each_named(tmp_path, caplog):
    root = tmp_path / "IJBC"
    gen = make_ijb(root)
    gone = ["3.png", "10.png"]  # 3.png's score is unreadable, 10.png's file is missing
    meta = root / "meta"
    text = (meta / "ijbc_name_5pts_score.txt").read_text().splitlines()
    text[2] = text[2].rsplit(" ", 1)[0] + " abc"
    text.append("extra.png 1 2 3")
    (meta / "ijbc_name_5pts_score.txt").write_text("\n".join(text) + "\n")
    (root / "loose_crop" / "10.png").unlink()
    with open(meta / "ijbc_face_tid_mid.txt", "a") as f:
        f.write("nosuch.png 1000 1\n")
    with open(meta / "ijbc_template_pair_label.txt", "a") as f:
        f.write("1000 1003 7\nx y 1\n")
    with caplog.at_level("WARNING"):
        result = run(root, Stub(gen["table"]), tmp_path / "out")
    layout = ijb.read_ijb(root)
    n_pairs = len(gen["pairs"])
    assert [str(e) for e in layout.problems["ijbc_name_5pts_score.txt"]] == [
        f"{meta / 'ijbc_name_5pts_score.txt'} line 3: a landmark or the score is not a number: "
        f"{' '.join(text[2].split()[1:])!r}",
        f"{meta / 'ijbc_name_5pts_score.txt'} line {len(text)}: 4 fields, expected 12 (image name, 10 landmark "
        "coordinates, score)"]
    tid_mid = [str(e) for e in layout.problems["ijbc_face_tid_mid.txt"]]
    assert len(tid_mid) == 2 and "has no landmarks" in tid_mid[0] and "nosuch.png" in tid_mid[1]
    pairs = [str(e) for e in layout.problems["ijbc_template_pair_label.txt"]]
    assert f"line {n_pairs + 2}: template ids and label must be integers" in pairs[0]
    assert f"line {n_pairs + 1}: label 7" in pairs[1]
    assert "(and 1 more)" in caplog.text and "10.png" in caplog.text
    assert result["bad_rows"] == {"ijbc_name_5pts_score.txt": 2, "ijbc_face_tid_mid.txt": 2,
                                  "ijbc_template_pair_label.txt": 2}
    assert result["n_images_unusable"] == 1
    # The result is that of a clean folder without those rows.
    clean = make_ijb(tmp_path / "clean", drop=tuple(gone))
    want = run(tmp_path / "clean", Stub(clean["table"]), tmp_path / "out2")
    assert result["verification"]["tar_at_far"] == want["verification"]["tar_at_far"]
    assert result["identification"]["G1"]["tpir_at_fpir"] == want["identification"]["G1"]["tpir_at_fpir"]
    feats = expected_templates(gen, drop=tuple(gone))
    scores = np.load(tmp_path / "out" / "ijbc_pair_scores.npz")["score"]
    np.testing.assert_allclose(scores, [feats[a] @ feats[b] for a, b, _ in gen["pairs"]], atol=1e-6)


def test_pair_rows_are_numbered_as_in_the_file(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("1 2 1\n\n3 4 5\n5 6 0")  # a blank line, a bad label, no newline at the end
    pairs, lines, bad = ijb._read_pairs(path)
    assert pairs.tolist() == [[1, 2, 1], [5, 6, 0]] and lines.tolist() == [1, 4]
    assert [str(e) for e in bad] == [f"{path} line 3: label 5, expected 1 (same subject) or 0"]
    path.write_text("1 2 1\n3 4 0\n")
    pairs, lines, bad = ijb._read_pairs(path)
    assert lines.tolist() == [1, 2] and not bad


def test_a_file_without_a_usable_row_is_one_error(ijbc, tmp_path):
    root, _ = ijbc
    broken = tmp_path / "IJBC"
    (broken / "meta").mkdir(parents=True)
    (broken / "loose_crop").symlink_to(root / "loose_crop")
    for f in (root / "meta").iterdir():
        (broken / "meta" / f.name).write_bytes(f.read_bytes())
    (broken / "meta" / "ijbc_template_pair_label.txt").write_text("1 2\n1 2 3 4\n")
    with pytest.raises(InputError, match=r"line 1: 2 fields.* \(and 1 more\); no usable row"):
        ijb.read_ijb(broken)
    no_images = tmp_path / "no_images"
    (no_images / "loose_crop").mkdir(parents=True)
    (no_images / "meta").symlink_to(root / "meta")
    n = SUBJECTS * TEMPLATES_PER_SUBJECT * 3
    with pytest.raises(InputError, match=rf"none of the {n} crops could be used: .*1.png.*\(and {n - 1} more\)"):
        run(no_images, Stub({}), tmp_path / "out")


def test_a_killed_run_resumes_from_its_cached_chunks(ijbc, tmp_path):
    root, gen = ijbc
    n = len(gen["images"])
    opts = dict(chunk_size=16, batch_size=8)
    batches = sum(-(-min(16, n - s) // 8) for s in range(0, n, 16))
    whole = run(root, Stub(gen["table"]), tmp_path / "whole", **opts)
    with pytest.raises(Stop):
        run(root, Stub(gen["table"], stop_after=5), tmp_path / "out", **opts)
    cache = next((tmp_path / "out" / "ijb_cache").iterdir())
    assert sorted(p.name for p in cache.glob("chunk-*.npz")) == ["chunk-00000.npz", "chunk-00001.npz"]
    assert not list(cache.glob(".*tmp"))  # no partial file left behind
    again = Stub(gen["table"])
    resumed = run(root, again, tmp_path / "out", **opts)
    assert again.calls == batches - 4  # two chunks of two batches each were cached
    assert resumed["verification"]["tar_at_far"] == whole["verification"]["tar_at_far"]
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "ijbc_pair_scores.npz")["score"],
                                  np.load(tmp_path / "whole" / "ijbc_pair_scores.npz")["score"])
    done = Stub(gen["table"])
    run(root, done, tmp_path / "out", **opts)
    assert done.calls == 0
    other = Stub(gen["table"])  # another model never reads this model's cache
    run(root, other, tmp_path / "out", **opts, model_id="another")
    assert other.calls == batches


def test_evaluate_command_writes_metrics_report_and_roc(ijbc, aligned_model, tmp_path):
    from facesiam.commands.evaluate import main

    root, gen = ijbc
    out = tmp_path / "report"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"bin": {"lfw": 0.9}}))
    (out / "report.md").write_text("# facesiam evaluation report\n\n## LFW\n\nkept\n")
    result = main(["--checkpoint", str(aligned_model), "--ijb", str(root), "--out", str(out), "--num-workers", "0",
                   "--device", "cpu", "--batch-size", "16"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bin"] == {"lfw": 0.9} and metrics["ijbc"]["verification"]["tar_at_far"] == result[
        "verification"]["tar_at_far"]
    saved = np.load(out / "ijbc_pair_scores.npz")
    assert np.all(np.isfinite(saved["score"])) and len(saved["score"]) == len(gen["pairs"])
    want = expected_tar(saved["score"].astype(np.float64), saved["label"] == 1)
    for key, tar in want.items():
        assert metrics["ijbc"]["verification"]["tar_at_far"][key] == (None if tar is None else pytest.approx(tar))
    report = (out / "report.md").read_text()
    assert "## LFW\n\nkept" in report and "## IJB-C" in report and "TAR@FAR=1e-04" in report
    assert "![IJB-C ROC](ijbc_roc.png)" in report and (out / "ijbc_roc.png").stat().st_size > 0
    assert "| G1 |" in report and "TPIR@FPIR=1e-02" in report
    main(["--checkpoint", str(aligned_model), "--ijb", str(root), "--out", str(out), "--num-workers", "0",
          "--device", "cpu"])
    assert (out / "report.md").read_text().count("## IJB-C") == 1  # the section is replaced, not repeated


def test_evaluate_ijb_needs_a_checkpoint(ijbc, tmp_path, capsys):
    from facesiam.commands.evaluate import main

    with pytest.raises(SystemExit):
        main(["--ijb", str(ijbc[0]), "--out", str(tmp_path / "r")])
    assert "--ijb takes a model" in capsys.readouterr().err
