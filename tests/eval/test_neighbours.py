"""The one-pass evaluator (facesiam.eval.score_pass + facesiam.eval.neighbours) against references computed
independently: pytorch-metric-learning's MAP@R, brute-force NumPy ranks over the full score matrix, scikit-learn's
ROC; across block sizes (the mirrored half of off-diagonal blocks), worker threads, compaction and bad models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facesiam.eval import neighbours
from facesiam.eval.identification import identification_split
from facesiam.eval.metrics import evaluate_embeddings, verification_metrics
from facesiam.eval.score_pass import score_pass

from .test_metrics import assert_fnir_matches_brute_force, assert_matches_sklearn, clustered, exact_pairs, unit


def pml_map_at_r(emb, labels):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=("mean_average_precision_at_r",), k="max_bin_count", device=torch.device("cpu"))
    return calc.get_accuracy(emb, labels)["mean_average_precision_at_r"]


def brute_identification(emb, labels, split):
    """Ranks, own scores and best non-mated gallery scores from the full probe x gallery matrix (float64)."""
    gallery, mated, nonmated, _ = split
    s = emb[np.r_[mated, nonmated]].astype(np.float64) @ emb[gallery].T.astype(np.float64)
    ranked = labels[gallery][np.argsort(-s, axis=1)]
    rank = np.argmax(ranked[:len(mated)] == labels[mated][:, None], axis=1) + 1
    return np.minimum(rank, 21), s[len(mated):].max(1) if len(nonmated) else np.zeros(0)


def map_at_r_of(emb, labels, **kw):
    return score_pass(emb, labels, bins=None, map_at_r=True, **kw).neighbours.map_at_r()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block", [64, 100, 4096])
def test_map_at_r_matches_pml_across_blocks_and_threads(threads, block):
    sizes = np.r_[150, np.random.default_rng(8).integers(1, 8, 120)]  # one identity spans several blocks
    emb, labels = clustered(len(sizes), sizes, 16, noise=1.4, seed=8)
    perm = np.random.default_rng(1).permutation(len(labels))  # labels not sorted: the pass sorts them
    emb, labels = emb[perm], labels[perm]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = map_at_r_of(emb, labels, block_size=block)
    finally:
        torch.set_num_threads(before)
    assert ours == pytest.approx(pml_map_at_r(emb, labels), abs=1e-6)


def test_map_at_r_of_a_random_model_with_constant_compaction(monkeypatch):
    # Random embeddings: a query's lowest genuine score is no filter at all, nearly every entry is collected
    # at first and only compaction (here after every slab) makes the thresholds tight.
    monkeypatch.setattr(neighbours, "COMPACT_ENTRIES", 1)
    rng = np.random.default_rng(3)
    emb = unit(rng.normal(size=(900, 8)))
    labels = rng.integers(0, 60, 900)
    assert map_at_r_of(emb, labels, block_size=128) == pytest.approx(pml_map_at_r(emb, labels), abs=1e-6)


def test_one_pass_equals_brute_force_for_every_metric():
    sizes = np.r_[300, np.random.default_rng(5).integers(1, 9, 150)]
    emb, labels = clustered(len(sizes), sizes, 16, noise=1.3, seed=5)
    paths = [f"{label:04d}/{i:05d}" for i, label in enumerate(labels)]
    m = evaluate_embeddings(emb, labels, paths, unenrolled=0.25, block_size=128)
    assert_matches_sklearn(m["verification"], *exact_pairs(emb, labels))
    ident = m["identification"]
    assert ident["map_at_r"] == pytest.approx(pml_map_at_r(emb, labels), abs=1e-6)
    split = identification_split(labels, paths, unenrolled=0.25)
    rank, _ = brute_identification(emb, labels, split)
    assert ident["cmc"] == pytest.approx([np.mean(rank <= r) for r in range(1, 21)])
    assert ident["rank1"] == pytest.approx(np.mean(rank == 1)) and 0.05 < ident["rank1"] < 0.95
    # The same numbers as the per-protocol entry points and as one big block.
    whole = evaluate_embeddings(emb, labels, paths, unenrolled=0.25, block_size=4096)
    for key in ("map_at_r", "rank1", "rank5", "cmc", "fnir_at_fpir", "threshold_at_fpir"):
        assert whole["identification"][key] == pytest.approx(ident[key]), key
    assert verification_metrics(emb, labels)["auc"] == pytest.approx(m["verification"]["auc"], abs=1e-6)


def test_ranks_and_open_set_scores_match_brute_force():
    emb, labels = clustered(200, np.random.default_rng(6).integers(1, 7, 200), 12, noise=1.5, seed=6)
    paths = [f"{label:04d}/{i:05d}" for i, label in enumerate(labels)]
    split = identification_split(labels, paths, unenrolled=0.3)
    gallery, mated, nonmated, _ = split
    result = score_pass(emb, labels, bins=None, split=split[:3], block_size=96)
    store = result.neighbours
    rank, best = brute_identification(emb, labels, split)
    np.testing.assert_array_equal(store.ranks(result.position[mated]), rank)
    assert (rank == 21).any() and (rank == 1).any()  # "beyond" and top-1 both occur
    np.testing.assert_allclose(store.best_gallery_scores(result.position[nonmated]), best, atol=1e-5)
    own = np.sum(emb[mated].astype(np.float64) * emb[gallery][np.searchsorted(labels[gallery], labels[mated])],
                 axis=1) if np.all(np.diff(labels[gallery]) > 0) else None
    if own is not None:
        np.testing.assert_allclose(store.own_scores(result.position[mated]), own, atol=1e-5)


def test_fnir_at_fpir_from_one_pass_matches_brute_force():
    emb, labels = clustered(150, np.random.default_rng(9).integers(1, 8, 150), 16, noise=1.2, seed=9)
    paths = [f"{label:04d}/{i:05d}" for i, label in enumerate(labels)]
    m = evaluate_embeddings(emb, labels, paths, unenrolled=0.4, block_size=64)["identification"]
    gallery, mated, nonmated, _ = identification_split(labels, paths, unenrolled=0.4)
    s = emb[np.r_[mated, nonmated]].astype(np.float64) @ emb[gallery].T.astype(np.float64)
    correct = labels[gallery][s[:len(mated)].argmax(1)] == labels[mated]
    top_mated, top_non = s[:len(mated)].max(1), s[len(mated):].max(1)
    assert_fnir_matches_brute_force(m, correct, top_mated, top_non)


def test_nothing_kept_for_singletons_and_no_pass_without_needs():
    emb = unit(np.random.default_rng(0).normal(size=(50, 8)))
    result = score_pass(emb, np.arange(50), bins=None, map_at_r=True)
    assert result.neighbours is None and result.histograms is None
    m = evaluate_embeddings(emb, np.arange(50))
    assert m["identification"]["map_at_r"] is None and m["identification"]["rank1"] is None


def test_kept_entries_stay_bounded_by_what_queries_need(monkeypatch):
    # After the final compaction a query keeps at most its R best impostors and a probe its top CMC gallery ones.
    monkeypatch.setattr(neighbours, "COMPACT_ENTRIES", 64)
    emb, labels = clustered(120, 5, 16, noise=1.0, seed=2)
    paths = [f"{label:04d}/{i:05d}" for i, label in enumerate(labels)]
    split = identification_split(labels, paths)
    store = score_pass(emb, labels, bins=None, map_at_r=True, split=split[:3], block_size=64).neighbours
    assert len(store.rows) <= len(labels) * (4 + neighbours.CMC_RANKS)
    per_row = np.bincount(store.rows.numpy(), minlength=len(labels))
    assert per_row.max() <= 4 + neighbours.CMC_RANKS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_same_pass_on_cuda_gives_the_cpu_numbers():
    sizes = np.r_[200, np.random.default_rng(6).integers(1, 9, 200)]
    emb, labels = clustered(len(sizes), sizes, 32, noise=1.3, seed=6)
    paths = [f"{label:04d}/{i:05d}" for i, label in enumerate(labels)]
    cpu = evaluate_embeddings(emb, labels, paths, unenrolled=0.25, block_size=256, device="cpu")
    gpu = evaluate_embeddings(emb, labels, paths, unenrolled=0.25, block_size=256, device="cuda")
    assert gpu["identification"]["map_at_r"] == pytest.approx(pml_map_at_r(emb, labels), abs=1e-6)
    for key in ("map_at_r", "rank1", "cmc", "fnir_at_fpir"):
        assert gpu["identification"][key] == pytest.approx(cpu["identification"][key], abs=1e-6), key
    assert gpu["verification"]["auc"] == pytest.approx(cpu["verification"]["auc"], abs=1e-6)
