"""The worst pairs of a held-out set: the highest-scoring impostor pairs and lowest-scoring genuine pairs."""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image

from facesiam.eval.worst_pairs import worst_pairs, write_worst_pairs


def test_worst_pairs_are_every_pairs_extremes(tmp_path):
    rng = np.random.default_rng(0)
    e = rng.normal(size=(30, 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    labels = rng.integers(0, 5, 30)
    got = worst_pairs(e, labels, n=4)
    # reference: a plain loop over every pair
    pairs = [(i, j, float(e[i] @ e[j])) for i, j in itertools.combinations(range(30), 2)]
    impostors = sorted((p for p in pairs if labels[p[0]] != labels[p[1]]), key=lambda p: -p[2])[:4]
    genuine = sorted((p for p in pairs if labels[p[0]] == labels[p[1]]), key=lambda p: p[2])[:4]
    for key, want in (("false_accepts", impostors), ("false_rejects", genuine)):
        assert [(i, j) for i, j, _ in got[key]] == [(i, j) for i, j, _ in want]
        np.testing.assert_allclose([s for *_, s in got[key]], [s for *_, s in want], rtol=1e-12)

    data = {"embeddings": e, "labels": labels, "classes": [f"p{k}" for k in range(5)]}
    page = write_worst_pairs(data, tmp_path, threshold=0.5, n=3, image=lambda i: Image.new("RGB", (20, 20)))
    assert page.name == "worst_pairs.html" and (tmp_path / "worst_pairs.png").is_file()
    assert page.read_text().count("<tr>") == 6
