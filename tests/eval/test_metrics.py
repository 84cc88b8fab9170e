"""facesiam.eval's metrics (metrics, verification, identification, gallery.topk_cosine) against independent
references: scikit-learn's exact ROC, pytorch-metric-learning's MAP@R, brute-force NumPy for 1:N search, and the
protocol definitions written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from facesiam.eval.gallery import topk_cosine
from facesiam.eval.identification import identification_split
from facesiam.eval.metrics import (evaluate_embeddings, identification_metrics, mean_average_precision_at_r,
                                   pair_histograms, verification_metrics)
from facesiam.eval.verification import FAR_TARGETS, equal_error_rate, far_key, score_metrics, tar_at_far


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n_ids, sizes, dim, noise, seed=0):
    """Identities as clusters, like real face embeddings; sizes: int or array of images per identity."""
    rng = np.random.default_rng(seed)
    sizes = np.full(n_ids, sizes) if np.isscalar(sizes) else np.asarray(sizes)
    labels = np.repeat(np.arange(n_ids), sizes)
    centres = rng.normal(size=(n_ids, dim))
    return unit(centres[labels] + noise * rng.normal(size=(len(labels), dim))), labels


def exact_pairs(emb, labels):
    """Every unordered pair of distinct images, scored by float64 cosine: the reference."""
    e = emb.astype(np.float64)
    iu = np.triu_indices(len(labels), 1)
    return (e @ e.T)[iu], labels[iu[0]] == labels[iu[1]]


def assert_matches_sklearn(metrics, scores, same, tol=1e-3):
    far, tar, thr = roc_curve(same, scores, drop_intermediate=False)
    assert metrics["n_genuine"] == same.sum() and metrics["n_impostor"] == (~same).sum()
    assert metrics["auc"] == pytest.approx(roc_auc_score(same, scores), abs=tol)
    eer, _ = equal_error_rate(far, tar, thr)
    assert metrics["eer"] == pytest.approx(eer, abs=tol)
    n_imp = int((~same).sum())
    for target in FAR_TARGETS:
        ours = metrics["tar_at_far"][far_key(target)]
        if n_imp * target < 1:
            assert ours is None
        else:
            assert ours == pytest.approx(tar[far <= target].max(), abs=tol), target
    balanced = ((tar + 1 - far) / 2).max()
    assert metrics["best_accuracy"] == pytest.approx(balanced, abs=tol)
    assert metrics["average_precision"] == pytest.approx(average_precision_score(same, scores), abs=tol)


@pytest.mark.parametrize("threads", [1, 2])
def test_verification_random_embeddings_match_sklearn(threads):
    rng = np.random.default_rng(1)
    emb = unit(rng.normal(size=(1500, 24)))
    labels = rng.integers(0, 150, 1500)  # unsorted labels, uneven identity sizes, singletons
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # 2: the worker-thread path, 1: inline
    try:
        m = verification_metrics(emb, labels, block_size=256)
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    assert_matches_sklearn(m, *exact_pairs(emb, labels))


def test_verification_clustered_with_ties_and_a_large_identity():
    # One identity of 700 images spans several blocks (slices, not index lists). Sign vectors in 32-d score only
    # multiples of 1/16: massive ties, genuine and impostor alike, exactly on bin edges.
    emb, labels = clustered(60, np.r_[700, np.random.default_rng(0).integers(1, 20, 59)], 32, noise=0.9)
    emb = unit(np.sign(emb))
    emb[800:803] = emb[0]  # identical images of two different identities: impostor pairs scoring 1.0
    m = verification_metrics(emb, labels, block_size=512)
    scores, same = exact_pairs(emb, labels)
    assert len(np.unique(scores)) <= 33
    assert_matches_sklearn(m, scores, same, tol=1e-6)


def test_histogram_counts_are_exact_and_independent_of_blocking():
    emb, labels = clustered(40, 12, 32, noise=1.0, seed=3)
    scores, same = exact_pairs(emb, labels)
    ref = None
    for block in (64, 100, 1000):
        h = pair_histograms(emb, labels, block_size=block)
        assert h.genuine.sum() == h.n_genuine == same.sum()
        assert h.impostor.sum() == h.n_impostor == (~same).sum()
        if ref is None:
            ref = h
        else:  # float round-off may move a pair by one bin between blockings, never more
            assert np.abs(np.cumsum(h.impostor) - np.cumsum(ref.impostor)).max() <= 2
    # Counts at or above each bin edge agree with the exact scores (a score right at an edge may go either way).
    edges = ref.lower_edges
    for t in (-0.1, 0.0, 0.2, 0.35, 0.5):
        k = int(np.searchsorted(edges, t))
        assert abs(ref.impostor[k:].sum() - np.sum(scores[~same] >= edges[k])) <= 1
        assert abs(ref.genuine[k:].sum() - np.sum(scores[same] >= edges[k])) <= 1


def test_verification_without_pairs_is_defined():
    emb = unit(np.random.default_rng(0).normal(size=(5, 8)))
    m = verification_metrics(emb, np.arange(5))  # all singletons: impostors only
    assert m["n_genuine"] == 0 and m["n_impostor"] == 10 and m["auc"] is None
    assert set(m["tar_at_far"]) == {far_key(t) for t in FAR_TARGETS}


def test_tar_at_far_is_null_below_one_over_far():
    far = np.array([0.0, 0.5, 1.0])
    tar = np.array([0.0, 0.9, 1.0])
    thr = np.array([np.inf, 0.3, 0.1])
    tars, thrs = tar_at_far(far, tar, thr, n_impostor=999)
    assert tars["1e-03"] is None and tars["1e-02"] == 0.0 and tars["1e-01"] == 0.0
    tars, _ = tar_at_far(far, tar, thr, n_impostor=1000)
    assert tars["1e-03"] == 0.0


def test_map_at_r_matches_pytorch_metric_learning():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    emb, labels = clustered(80, np.random.default_rng(2).integers(1, 15, 80), 16, noise=1.6, seed=2)
    calc = AccuracyCalculator(include=("mean_average_precision_at_r",), k="max_bin_count", device=torch.device("cpu"))
    expected = calc.get_accuracy(emb, labels)["mean_average_precision_at_r"]
    assert mean_average_precision_at_r(emb, labels) == pytest.approx(expected, abs=1e-9)


def test_map_at_r_with_a_large_identity_matches_pytorch_metric_learning():
    # One identity of 400 images among small ones: queries are chunked by R, each chunk with its own top-k.
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    sizes = np.r_[400, np.random.default_rng(8).integers(1, 8, 150)]
    emb, labels = clustered(len(sizes), sizes, 16, noise=1.4, seed=8)
    calc = AccuracyCalculator(include=("mean_average_precision_at_r",), k="max_bin_count", device=torch.device("cpu"))
    expected = calc.get_accuracy(emb, labels)["mean_average_precision_at_r"]
    # 1e-6, not 1e-9: PML ranks by faiss's float32 L2 distances, we by cosine; a near-tie among 160,000 ordered
    # pairs may order differently (a ~1e-8 difference, the same before queries were chunked by R).
    assert mean_average_precision_at_r(emb, labels) == pytest.approx(expected, abs=1e-6)


def test_topk_cosine_matches_brute_force_across_blocks():
    rng = np.random.default_rng(4)
    q, ref = unit(rng.normal(size=(70, 12))), unit(rng.normal(size=(300, 12)))
    exclude = rng.integers(0, 300, 70)
    s, i = topk_cosine(q, ref, 7, exclude=exclude, query_block=16, reference_block=50)
    full = q.astype(np.float64) @ ref.T.astype(np.float64)
    full[np.arange(70), exclude] = -np.inf
    expected = np.argsort(-full, axis=1)[:, :7]
    np.testing.assert_array_equal(i, expected)
    np.testing.assert_allclose(s, np.take_along_axis(full, expected, 1), atol=1e-5)
    assert np.all(np.diff(s, axis=1) <= 0)


def test_identification_split_follows_the_definition():
    labels = np.array([3, 3, 3, 7, 9, 9, 5, 5, 5, 5])
    paths = ["c/2.jpg", "c/0.jpg", "c/1.jpg", "s/0.jpg", "n/1.jpg", "n/0.jpg", "f/3", "f/1", "f/2", "f/0"]
    gallery, mated, nonmated, held = identification_split(labels, paths)
    # First in path order: c/0 (index 1), f/0 (9), n/0 (5); identity 7 has one image and takes no part.
    assert sorted(gallery.tolist()) == [1, 5, 9]
    assert sorted(mated.tolist()) == [0, 2, 4, 6, 7, 8]
    assert len(nonmated) == 0 and len(held) == 0
    gallery, mated, nonmated, held = identification_split(labels, paths, unenrolled=1, seed=0)
    assert len(held) == 1 and held[0] in (3, 5, 9)
    assert sorted(nonmated.tolist()) == np.flatnonzero(labels == held[0]).tolist()
    assert held[0] not in labels[gallery] and held[0] not in labels[mated]
    assert len(identification_split(labels, paths, unenrolled=0.34)[3]) == 1
    with pytest.raises(ValueError, match="fewer than"):
        identification_split(labels, paths, unenrolled=3)


def test_identification_matches_brute_force_closed_and_open_set():
    emb, labels = clustered(120, np.random.default_rng(5).integers(1, 9, 120), 16, noise=1.3, seed=5)
    paths = [f"{l:04d}/{i:05d}" for i, l in enumerate(labels)]
    m = identification_metrics(emb, labels, paths, unenrolled=0.25)
    gallery, mated, nonmated, _ = identification_split(labels, paths, unenrolled=0.25)
    s = emb[np.r_[mated, nonmated]].astype(np.float64) @ emb[gallery].T.astype(np.float64)
    ranked = labels[gallery][np.argsort(-s, axis=1)]
    rank = np.argmax(ranked[:len(mated)] == labels[mated][:, None], axis=1) + 1
    assert m["gallery_size"] == len(gallery) and m["n_probes"] == len(mated) + len(nonmated)
    assert m["rank1"] == pytest.approx(np.mean(rank == 1))
    assert m["rank5"] == pytest.approx(np.mean(rank <= 5))
    assert m["cmc"] == pytest.approx([np.mean(rank <= r) for r in range(1, 21)])
    # FNIR@FPIR (rank 1): sweep every threshold by brute force.
    top_mated, top_non = s[:len(mated)].max(1), s[len(mated):].max(1)
    correct = ranked[:len(mated), 0] == labels[mated]
    assert_fnir_matches_brute_force(m, correct, top_mated, top_non)
    assert m["map_at_r"] == pytest.approx(mean_average_precision_at_r(emb, labels))


def test_evaluate_embeddings_keys():
    emb, labels = clustered(30, 4, 8, noise=1.0)
    m = evaluate_embeddings(emb, labels)
    assert {"n_embeddings", "n_identities", "verification", "identification"} <= set(m)
    assert m["n_embeddings"] == 120 and m["n_identities"] == 30
    v = m["verification"]
    for key in ("n_genuine", "n_impostor", "auc", "eer", "eer_threshold", "best_accuracy", "best_threshold",
                "tar_at_far"):
        assert key in v
    assert list(v["tar_at_far"]) == ["1e-01", "1e-02", "1e-03", "1e-04", "1e-05", "1e-06"]
    i = m["identification"]
    for key in ("gallery_size", "n_probes", "rank1", "rank5", "cmc", "map_at_r"):
        assert key in i
    assert len(i["cmc"]) == 20 and "fnir_at_fpir" not in i
    assert list(evaluate_embeddings(emb, labels, unenrolled=3)["identification"]["fnir_at_fpir"]) == \
        ["1e-01", "1e-02", "1e-03"]


def test_average_precision_matches_sklearn_all_pairs_and_in_memory_scores():
    # Well-spread clustered scores: AP from the 2**16-bin histogram within 1e-3 of sklearn's exact AP; the
    # in-memory (pairs-file) path uses sklearn's full ROC and must agree to round-off.
    emb, labels = clustered(60, np.random.default_rng(7).integers(2, 12, 60), 16, noise=1.2, seed=7)
    scores, same = exact_pairs(emb, labels)
    expected = average_precision_score(same, scores)
    assert 0.05 < expected < 0.99  # not a degenerate case
    assert verification_metrics(emb, labels)["average_precision"] == pytest.approx(expected, abs=1e-3)
    assert score_metrics(scores, same)["average_precision"] == pytest.approx(expected, abs=1e-9)


def assert_fnir_matches_brute_force(m: dict, correct, top_mated, top_non) -> None:
    """FNIR@FPIR (rank 1) of identification metrics ``m`` against a sweep of every threshold by brute force."""
    for target in (1e-1, 1e-2):
        key = far_key(target)
        if len(top_non) * target < 1:
            assert m["fnir_at_fpir"][key] is None
            continue
        best = min(1 - np.mean(correct & (top_mated >= t)) for t in np.r_[top_non, top_mated, 2.0]
                   if np.mean(top_non >= t) <= target)
        assert m["fnir_at_fpir"][key] == pytest.approx(best, abs=1e-9)
