"""Gallery: build / add / search round trip, save and load, identity-level top-k, approximate indexes' recall, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facesiam.commands.gallery import main
from facesiam.eval.embed import save_embeddings
from facesiam.eval.gallery import Gallery



def clustered(n_ids, per, dim=32, noise=0.5, seed=0, noise_seed=None):
    """Identities as clusters (centres from ``seed``); another ``noise_seed`` gives new images of the same people."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_ids), per)
    centres = rng.normal(size=(n_ids, dim))
    if noise_seed is not None:
        rng = np.random.default_rng(noise_seed)
    x = centres[labels] + noise * rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def brute_identities(gallery_x, gallery_names, q, k):
    s = q @ gallery_x.T
    out = []
    for row in s:
        best = {}
        for j in np.argsort(-row):
            best.setdefault(gallery_names[j], float(row[j]))
            if len(best) == k:
                break
        out.append(list(best.items()))
    return out


def test_flat_search_returns_exact_top_k_identities(tmp_path):
    x, labels = clustered(50, 4)
    names = [f"id{l}" for l in labels]
    g = Gallery.build(x, names, [f"{n}/{i}.jpg" for i, n in enumerate(names)])
    assert g.size == 200 and len(g.names) == 50
    # Measured, not declared: FAISS's flat index and the exact torch search agree on every probe's top identity.
    q_recall, _ = clustered(50, 1, seed=2)
    assert g.estimate_recall() == 1.0 and g.estimate_recall(queries=q_recall) == 1.0
    q, _ = clustered(50, 1, seed=1)
    hits = g.search(q, k=5)
    expected = brute_identities(x, names, q, 5)
    for got, want in zip(hits, expected):
        assert [h["identity"] for h in got] == [n for n, _ in want]
        assert [h["score"] for h in got] == pytest.approx([s for _, s in want], abs=1e-5)
        assert got[0]["path"].startswith(got[0]["identity"] + "/")


def test_save_load_add_round_trip(tmp_path):
    x, labels = clustered(20, 3)
    g = Gallery.build(x, [f"id{l}" for l in labels])
    g.save(tmp_path / "g")
    loaded = Gallery.load(tmp_path / "g")
    q = x[::7] + 0.01
    assert loaded.search(q, 3) == g.search(q, 3)
    new, _ = clustered(2, 2, seed=9)
    loaded.add(new, ["newcomer", "newcomer", "id3", "id3"], ["n/0", "n/1", "x/0", "x/1"])
    loaded.save(tmp_path / "g")
    again = Gallery.load(tmp_path / "g")
    assert again.size == 64 and len(again.names) == 21 and again.names[-1] == "newcomer"
    top = again.search(new[:1], 1)[0][0]
    assert top["identity"] == "newcomer" and top["score"] == pytest.approx(1.0, abs=1e-5) and top["path"] == "n/0"
    with pytest.raises(ValueError, match="dimension"):
        again.add(np.ones((1, 5), np.float32), ["x"])
    with pytest.raises(FileNotFoundError, match="not a gallery"):
        Gallery.load(tmp_path)
    with pytest.raises(FileExistsError):
        again.save(tmp_path / "g", overwrite=False)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_state_and_reach_their_recall(kind, tmp_path):
    x, labels = clustered(400, 5, dim=32, noise=0.6)
    g = Gallery.build(x, [str(l) for l in labels], kind=kind, target_recall=0.99)
    assert g.meta["recall_at_1_estimate"] >= 0.99
    knob = "nprobe" if kind == "ivf" else "efSearch"
    assert knob in g.meta["params"]
    # New images of the enrolled people: the top identity agrees with exact search as often as estimated.
    q, _ = clustered(400, 1, dim=32, noise=0.6, noise_seed=7)
    exact = Gallery.build(x, [str(l) for l in labels]).search(q, 1)
    approx = g.search(q, 1)
    agree = np.mean([a[0]["identity"] == e[0]["identity"] for a, e in zip(approx, exact)])
    assert agree >= 0.97
    measured = g.estimate_recall(queries=q)
    assert measured >= 0.97 and agree >= measured - 1e-9  # same entry found => same identity
    g.save(tmp_path / kind)
    loaded = Gallery.load(tmp_path / kind)
    assert loaded.meta["params"][knob] == g.meta["params"][knob]
    assert loaded.search(q[:20], 3) == g.search(q[:20], 3)


def test_gallery_command_line(tmp_path, capsys):
    x, labels = clustered(10, 3)
    classes = [f"person{i}" for i in range(10)]
    paths = [f"{classes[l]}/{i}.png" for i, l in enumerate(labels)]
    save_embeddings(tmp_path / "g.npz", x[:24], labels[:24], paths[:24], classes)
    save_embeddings(tmp_path / "more.npz", x[24:], labels[24:], paths[24:], classes)
    save_embeddings(tmp_path / "probes.npz", x[::3] + 0.01, labels[::3], [f"probe{i}" for i in range(10)], classes)
    main(["build", "--embeddings", str(tmp_path / "g.npz"), "--out", str(tmp_path / "G")])
    with pytest.raises(SystemExit, match="exists"):
        main(["build", "--embeddings", str(tmp_path / "g.npz"), "--out", str(tmp_path / "G")])
    main(["add", "--index", str(tmp_path / "G"), "--embeddings", str(tmp_path / "more.npz")])
    capsys.readouterr()
    main(["search", "--index", str(tmp_path / "G"), "--embeddings", str(tmp_path / "probes.npz"), "-k", "2"])
    out = json.loads(capsys.readouterr().out)
    assert out["exact"] and out["kind"] == "flat" and out["k"] == 2 and len(out["results"]) == 10
    for i, r in enumerate(out["results"]):
        assert r["probe"] == f"probe{i}" and r["matches"][0]["identity"] == classes[labels[::3][i]]
        assert len(r["matches"]) == 2 and r["matches"][0]["score"] >= r["matches"][1]["score"]
    main(["info", "--index", str(tmp_path / "G")])
    info = json.loads(capsys.readouterr().out)
    assert info["size"] == 30 and info["identities"] == 10


def test_build_from_a_folder_and_search_by_image(tiny_model_dir, face_folder, tmp_path, capsys):  # noqa: F811
    main(["build", "--checkpoint", str(tiny_model_dir), "--data", str(face_folder), "--out", str(tmp_path / "G"),
          "--num-workers", "0", "--device", "cpu"])
    probe = sorted(face_folder.rglob("*.png"))[5]
    capsys.readouterr()
    main(["search", "--index", str(tmp_path / "G"), "--checkpoint", str(tiny_model_dir), "--image", str(probe),
          "-k", "3", "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    top = out["results"][0]["matches"][0]
    # The probe is itself in the gallery: its own entry comes first with cosine 1.
    assert out["results"][0]["probe"] == str(probe) and top["identity"] == probe.parent.name
    assert top["score"] == pytest.approx(1.0, abs=1e-4) and top["path"] == f"{probe.parent.name}/{probe.name}"
    assert len(out["results"][0]["matches"]) == 3
    with pytest.raises(SystemExit, match="needs --checkpoint"):
        main(["search", "--index", str(tmp_path / "G"), "--image", str(probe)])
    with pytest.raises(SystemExit, match="not a gallery"):
        main(["search", "--index", str(tmp_path), "--image", str(probe)])


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_remove_an_identity_equals_a_gallery_built_without_it(kind, tmp_path):
    x, labels = clustered(300, 4, dim=32, noise=0.6)
    names = [f"p{l}" for l in labels]
    paths = [f"img{i}.jpg" for i in range(len(x))]
    g = Gallery.build(x, names, paths, kind=kind, target_recall=0.99)
    knob = {"flat": None, "ivf": "nprobe", "hnsw": "efSearch"}[kind]
    before = g.copy()
    assert g.remove("p7") == 4 and g.remove("p7") == 0 and g.remove("nobody") == 0
    assert before.size == len(x) and "p7" in before.names  # the copy is independent
    keep = labels != 7
    assert g.size == keep.sum() and "p7" not in g.names and len(g.names) == 299
    assert g.paths == [p for p, k in zip(paths, keep) if k]
    assert [g.names[i] for i in g.identity] == [n for n, k in zip(names, keep) if k]
    np.testing.assert_allclose(g.vectors(), x[keep], atol=1e-6)
    if knob:
        assert g.meta["params"][knob] == before.meta["params"][knob]
    q, _ = clustered(300, 1, dim=32, noise=0.6, noise_seed=3)
    want = brute_identities(x[keep], [n for n, k in zip(names, keep) if k], q, 3)
    got = [[(m["identity"], m["score"]) for m in row] for row in g.search(q, 3)]
    if kind == "flat":
        assert [[n for n, _ in r] for r in got] == [[n for n, _ in r] for r in want]
        np.testing.assert_allclose([[s for _, s in r] for r in got], [[s for _, s in r] for r in want], atol=1e-5)
    else:  # approximate: the top identity agrees with exact search at the recall it was tuned for
        assert np.mean([a[0][0] == b[0][0] for a, b in zip(got, want)]) >= 0.95
    g.add(x[labels == 7], ["p7"] * 4)  # and can be enrolled again
    g.save(tmp_path / kind)
    loaded = Gallery.load(tmp_path / kind)
    assert loaded.size == len(x) and loaded.search(q[:20], 3) == g.search(q[:20], 3)
