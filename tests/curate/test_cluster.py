"""curate/cluster.py: the clustering methods recover well-separated people; the scores match a brute-force count."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from facesiam.curate.cluster import METHODS, UNSURE, as_partition, cluster_embeddings, cluster_scores, renumber
from facesiam.errors import InputError


def _people(n_people: int, per: int, dim: int = 32, spread: float = 0.15, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_people, dim))
    x = np.repeat(centres, per, axis=0) / np.sqrt(dim) + spread * rng.normal(size=(n_people * per, dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(n_people), per)


def _brute_force(pred, truth):
    """Pairwise and BCubed scores by looping over every pair and every item (independent of the Counter version)."""
    n = len(pred)
    together = same = right = 0
    for i, j in itertools.combinations(range(n), 2):
        together += pred[i] == pred[j]
        same += truth[i] == truth[j]
        right += pred[i] == pred[j] and truth[i] == truth[j]
    bp, br = [], []
    for i in range(n):
        cluster = [j for j in range(n) if pred[j] == pred[i]]
        person = [j for j in range(n) if truth[j] == truth[i]]
        common = len(set(cluster) & set(person))
        bp.append(common / len(cluster))
        br.append(common / len(person))
    p, r = np.mean(bp), np.mean(br)
    return {"pairwise_precision": right / together, "pairwise_recall": right / same,
            "bcubed_precision": p, "bcubed_recall": r, "bcubed_f": 2 * p * r / (p + r)}


@pytest.mark.parametrize("method", METHODS)
def test_methods_recover_separated_people(method):
    x, y = _people(12, 5)
    clusters = cluster_embeddings(x, threshold=0.6, method=method)
    assert cluster_scores(clusters, y.tolist())["bcubed_f"] == pytest.approx(1.0)


def test_scores_equal_brute_force_with_unsure_photos():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 6, 40).tolist()
    pred = rng.integers(-1, 8, 40)  # -1: unsure, each its own cluster
    got = cluster_scores(pred, truth)
    want = _brute_force(as_partition(pred).tolist(), truth)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_a_strict_threshold_leaves_photos_unsure_and_a_loose_one_merges():
    x, y = _people(6, 4, spread=0.6, seed=1)
    strict = cluster_embeddings(x, threshold=0.999)
    assert (strict == UNSURE).all()
    loose = cluster_embeddings(x, threshold=-1.0)
    assert (loose == 0).all()


def test_renumber_by_size_and_min_size():
    out = renumber(np.array([5, 7, 7, 9, 9, 9, 4]), min_size=2)
    assert out.tolist() == [UNSURE, 1, 1, 0, 0, 0, UNSURE]


def test_unknown_method_is_one_line():
    with pytest.raises(InputError, match="unknown clustering method"):
        cluster_embeddings(np.eye(3, dtype=np.float32), 0.5, method="kmeans")


def test_compare_clustering_tool_prints_every_method(tmp_path, capsys):
    from facesiam.eval.embed import save_embeddings

    from ..conftest import load_tool

    x, y = _people(8, 4)
    save_embeddings(tmp_path / "e.npz", x, y, [f"{i}.jpg" for i in range(len(y))], [str(i) for i in range(8)])
    out = load_tool("compare_clustering").main([str(tmp_path / "e.npz"), "--threshold", "0.6",
                                                 "--thresholds", "0.5,0.7"])
    assert set(out) == set(METHODS) and all(s["bcubed_f"] == pytest.approx(1.0) for s in out.values())
    assert "| average | 1.0000" in capsys.readouterr().out
