"""Pairs files: both header forms, image-number rules, make -> write -> read round trip, 10-fold accuracy."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from facesiam.commands.make_pairs import main
from facesiam.eval.pairs import (ImageNumbers, Pair, best_threshold, evaluate_pairs_file, make_pairs, pairs_metrics,
                            read_pairs, resolve_pairs, write_pairs)


def test_read_folds_header(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("2\t2\nA\t1\t2\nB\t1\t3\nA\t1\tB\t2\nC\t1\tA\t2\n"
                    "C\t1\t2\nD\t2\t3\nD\t1\tC\t1\nB\t2\tA\t1\n")
    folds = read_pairs(path)
    assert len(folds) == 2 and [len(f) for f in folds] == [4, 4]
    assert folds[0][0] == Pair("A", 1, "A", 2) and folds[0][0].same
    assert folds[1][3] == Pair("B", 2, "A", 1) and not folds[1][3].same


def test_read_single_number_header_splits_into_ten_interleaved_folds(tmp_path):
    lines = ["20"] + [f"P{i}\t1\t2" for i in range(20)] + [f"P{i}\t1\tQ{i}\t1" for i in range(20)]
    path = tmp_path / "pairsDevTrain.txt"
    path.write_text("\n".join(lines) + "\n")
    folds = read_pairs(path)
    assert len(folds) == 10
    assert [p.name1 for p in folds[3]] == ["P3", "P13", "P3", "P13"]
    assert [p.same for p in folds[3]] == [True, True, False, False]


@pytest.mark.parametrize("text, message", [
    ("x y\nA 1 2\n", "header"),
    ("1 1\nA 1 2\n", "found 1"),
    ("1 1\nA 1 2 3 4 5\nA 1 B 1\n", ":2:"),
    ("1 1\nA 0 2\nA 1 B 1\n", "1-based"),
])
def test_malformed_pairs_files_name_file_and_problem(tmp_path, text, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        read_pairs(path)
    assert "bad.txt" in str(err.value)


def test_image_numbers_lfw_names_and_sorted_order():
    paths = ["Ann/Ann_0005.jpg", "Ann/Ann_0002.jpg", "Bob/z.png", "Bob/a.png", "Bob/m.png"]
    labels = [0, 0, 1, 1, 1]
    numbers = ImageNumbers(paths, labels, ["Ann", "Bob"])
    # LFW naming: the number is the file's; otherwise the i-th in sorted path order.
    assert numbers.row("Ann", 5) == 0 and numbers.row("Ann", 2) == 1 and numbers.row("Ann", 1) is None
    assert [numbers.row("Bob", i) for i in (1, 2, 3)] == [3, 4, 2] and numbers.row("Bob", 4) is None
    assert numbers.number(0, "Ann") == 5 and numbers.number(2, "Bob") == 3
    with pytest.raises(ValueError, match="1 of 2 pairs"):
        resolve_pairs([[Pair("Ann", 2, "Ann", 5), Pair("Ann", 1, "Bob", 1)]], numbers, "p.txt")


def _dataset(n_ids=60, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 8, n_ids)
    classes = [f"person_{i:02d}" for i in range(n_ids)]
    labels = np.repeat(np.arange(n_ids), sizes)
    paths = [f"{classes[l]}/{classes[l]}_{k + 1:04d}.jpg" for l in range(n_ids) for k in range(sizes[l])]
    return paths, labels, classes


def test_make_write_read_round_trip(tmp_path):
    paths, labels, classes = _dataset()
    folds = make_pairs(paths, labels, classes, folds=3, pairs_per_fold=15, seed=1)
    assert [sum(p.same for p in f) for f in folds] == [15, 15, 15]
    assert [sum(not p.same for p in f) for f in folds] == [15, 15, 15]
    all_pairs = [p for f in folds for p in f]
    keys = [(p.name1, p.image1, p.name2, p.image2) for p in all_pairs]
    assert len(set(keys)) == len(keys), "no pair repeats"
    assert all(p.image1 != p.image2 for p in all_pairs if p.same)
    people = [{n for p in f for n in (p.name1, p.name2)} for f in folds]
    assert not (people[0] & people[1]) and not (people[1] & people[2]), "folds have distinct people, as in LFW"
    write_pairs(folds, tmp_path / "pairs.txt")
    assert read_pairs(tmp_path / "pairs.txt") == folds
    resolved = resolve_pairs(folds, ImageNumbers(paths, labels, classes))
    for fold, rows in zip(folds, resolved):
        for p, (a, b, same) in zip(fold, rows):
            assert paths[a] == f"{p.name1}/{p.name1}_{p.image1:04d}.jpg" and bool(same) == p.same
    assert make_pairs(paths, labels, classes, folds=3, pairs_per_fold=15, seed=1) == folds
    assert make_pairs(paths, labels, classes, folds=3, pairs_per_fold=15, seed=2) != folds


def test_make_pairs_refuses_impossible_requests():
    paths, labels, classes = _dataset(n_ids=4)
    with pytest.raises(ValueError, match="pairs-per-fold"):
        make_pairs(paths, labels, classes, folds=10, pairs_per_fold=300)


def test_best_threshold_is_exact():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=300), 1)  # ties
    same = rng.random(300) < 0.5 + 0.3 * np.tanh(scores)
    threshold, acc = best_threshold(scores, same)
    brute = max(np.mean((scores >= t) == same) for t in np.r_[np.unique(scores), 99.0])
    assert acc == pytest.approx(brute)
    assert np.mean((scores >= threshold) == same) == pytest.approx(brute)


def test_pairs_metrics_ten_fold_protocol():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(200, 8)).astype(np.float32)
    resolved = []
    for _ in range(10):
        a, b = rng.integers(0, 200, 40), rng.integers(0, 200, 40)
        same = np.r_[np.ones(20), np.zeros(20)].astype(np.int64)
        emb[b[:20]] = emb[a[:20]] + 0.8 * rng.normal(size=(20, 8))  # make "same" pairs similar
        resolved.append(np.c_[a, b, same])
    m = pairs_metrics(emb, resolved, "x.txt")
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    scores = [np.sum(e[r[:, 0]] * e[r[:, 1]], 1) for r in resolved]
    accs = []
    for f in range(10):
        # Each fold's threshold is optimal on the other nine folds (brute force over every candidate) ...
        train_s = np.concatenate([s for g, s in enumerate(scores) if g != f])
        train_y = np.concatenate([r[:, 2] for g, r in enumerate(resolved) if g != f]).astype(bool)
        best = max(np.mean((train_s >= t) == train_y) for t in np.r_[np.unique(train_s), 9.0])
        threshold = m["folds"][f]["threshold"]
        assert np.mean((train_s >= threshold) == train_y) == pytest.approx(best)
        # ... and the fold's accuracy is that threshold applied to the held-out fold.
        accs.append(np.mean((scores[f] >= threshold) == resolved[f][:, 2].astype(bool)))
    assert [f["accuracy"] for f in m["folds"]] == pytest.approx(accs)
    assert m["accuracy_mean"] == pytest.approx(np.mean(accs)) and m["accuracy_std"] == pytest.approx(np.std(accs))
    all_y = np.concatenate([r[:, 2] for r in resolved])
    assert m["auc"] == pytest.approx(roc_auc_score(all_y, np.concatenate(scores)))
    assert m["n_same"] == 200 and m["n_different"] == 200 and set(m["tar_at_far"]) >= {"1e-01", "1e-02"}


def test_make_pairs_command_on_an_image_folder(tmp_path):
    from PIL import Image

    for person in range(12):
        for k in range(3):
            folder = tmp_path / "faces" / f"p{person:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (person * 20, k * 40, 0)).save(folder / f"{k}.png")
    main([str(tmp_path / "faces"), "--out", str(tmp_path / "pairs.txt"), "--folds", "2", "--pairs-per-fold", "5"])
    folds = read_pairs(tmp_path / "pairs.txt")
    assert len(folds) == 2 and all(len(f) == 10 for f in folds)
    # Evaluating the file against embeddings of the same folder resolves every pair.
    labels = np.repeat(np.arange(12), 3)
    paths = [f"p{i:02d}/{k}.png" for i in range(12) for k in range(3)]
    emb = np.random.default_rng(0).normal(size=(36, 4)).astype(np.float32)
    m = evaluate_pairs_file(tmp_path / "pairs.txt", emb, paths, labels, [f"p{i:02d}" for i in range(12)])
    assert m["n_pairs"] == 20 and len(m["folds"]) == 2
