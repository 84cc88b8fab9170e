"""evaluate end to end: a tiny exported model -> embed -> make_pairs -> evaluate -> metrics.json, plots, report."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from facesiam.commands.embed import main as embed_main
from facesiam.commands.evaluate import main
from facesiam.commands.make_pairs import main as make_pairs_main
from facesiam.eval.embed import load_embeddings
from facesiam.eval.metrics import evaluate_embeddings
from facesiam.eval.pairs import evaluate_pairs_file

from ..conftest import shared_dataset

VERIFICATION_KEYS = {"n_genuine", "n_impostor", "auc", "eer", "eer_threshold", "best_accuracy", "best_threshold",
                     "tar_at_far"}
IDENTIFICATION_KEYS = {"gallery_size", "n_probes", "rank1", "rank5", "cmc", "map_at_r"}
PAIRS_KEYS = {"folds", "accuracy_mean", "accuracy_std", "auc", "tar_at_far"}


@pytest.fixture(scope="module")
def report(tiny_model_dir, face_folder, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("eval")
    embed_main(["--checkpoint", str(tiny_model_dir), "--data", str(face_folder), "--out", str(tmp / "emb.npz"),
                "--num-workers", "0"])
    make_pairs_main([str(face_folder), "--out", str(tmp / "pairs.txt"), "--folds", "2", "--pairs-per-fold", "8"])
    main(["--embeddings", str(tmp / "emb.npz"), "--out", str(tmp / "report"), "--pairs", str(tmp / "pairs.txt"),
          "--unenrolled", "2"])
    return tmp


def test_report_files_and_metrics(report):
    out = report / "report"
    for name in ("metrics.json", "report.md", "roc.png", "det.png", "score_hist.png", "cmc.png", "pairs_folds.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_embeddings"] == 40 and m["n_identities"] == 10
    assert VERIFICATION_KEYS <= set(m["verification"]) and IDENTIFICATION_KEYS <= set(m["identification"])
    assert PAIRS_KEYS <= set(m["pairs"]) and len(m["pairs"]["folds"]) == 2
    assert list(m["identification"]["fnir_at_fpir"]) == ["1e-01", "1e-02", "1e-03"]
    # The report's numbers are those of the library functions on the same embeddings.
    data = load_embeddings(report / "emb.npz")
    direct = evaluate_embeddings(data["embeddings"], data["labels"], data["paths"], unenrolled=2)
    assert m["verification"]["auc"] == pytest.approx(direct["verification"]["auc"])
    assert m["identification"]["cmc"] == pytest.approx(direct["identification"]["cmc"])
    pairs = evaluate_pairs_file(report / "pairs.txt", data["embeddings"], data["paths"], data["labels"],
                                data["classes"])
    assert m["pairs"]["accuracy_mean"] == pytest.approx(pairs["accuracy_mean"])
    text = (out / "report.md").read_text()
    for needle in ("1:1 verification", "1:N identification", "Pairs protocol", "emb.npz", "date:", "roc.png",
                   f"{m['verification']['auc']:.5f}"):
        assert needle in text, needle


def test_checkpoint_and_data_give_the_same_metrics(report, tiny_model_dir, face_folder, tmp_path):  # noqa: F811
    main(["--checkpoint", str(tiny_model_dir), "--data", str(face_folder), "--out", str(tmp_path / "r"),
          "--num-workers", "0", "--protocol", "verification"])
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    ref = json.loads((report / "report" / "metrics.json").read_text())
    assert "identification" not in m and "pairs" not in m
    assert m["verification"]["auc"] == pytest.approx(ref["verification"]["auc"], abs=1e-6)
    assert m["source"]["checkpoint"] == str(tiny_model_dir) and "embed" in m["timing"]
    assert (tmp_path / "r" / "roc.png").is_file() and not (tmp_path / "r" / "cmc.png").exists()


def test_wandb_gets_the_metrics_and_plots(report, monkeypatch, tmp_path):
    logged, inits = {}, {}

    class Run:
        def log(self, data):
            logged.update(data)

        def finish(self):
            logged["_finished"] = True

    fake = types.SimpleNamespace(init=lambda **kw: inits.update(kw) or Run(), Image=lambda p: ("image", p),
                                 Table=lambda data, columns: ("table", data))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    main(["--embeddings", str(report / "emb.npz"), "--out", str(tmp_path / "w"), "--wandb", "offline"])
    assert inits["mode"] == "offline" and logged["_finished"]
    assert logged["eval/verification/auc"] == pytest.approx(
        json.loads((tmp_path / "w" / "metrics.json").read_text())["verification"]["auc"])
    assert logged["eval/roc"][0] == "image" and "eval/identification/rank1" in logged


def test_bad_invocations_say_what_to_do(report, tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:  # argparse's usage error: status 2, the reason on stderr
        main(["--out", str(tmp_path / "x")])
    assert usage.value.code == 2 and "either --embeddings" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="embeddings file .*missing.npz not found; make it with tools/embed.py"):
        main(["--embeddings", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--pairs"):
        main(["--embeddings", str(report / "emb.npz"), "--out", str(tmp_path / "x"), "--protocol", "pairs"])
    bad = tmp_path / "bad_pairs.txt"
    bad.write_text("1 1\nnobody 1 2\nnobody 1 someone 1\n")
    with pytest.raises(SystemExit, match="bad_pairs.txt: 2 of 2 pairs name images not in the data"):
        main(["--embeddings", str(report / "emb.npz"), "--out", str(tmp_path / "x"), "--pairs", str(bad)])


def test_real_faces_orl(tiny_model_dir, tmp_path):
    from sklearn.metrics import roc_auc_score

    orl = shared_dataset("orl")
    # A random model squeezes every cosine into [0.996, 1]: a finer histogram keeps the binned AUC exact to 1e-3.
    main(["--checkpoint", str(tiny_model_dir), "--data", str(orl), "--out", str(tmp_path / "orl"),
          "--num-workers", "0", "--batch-size", "100", "--bins", str(1 << 22)])
    embed_main(["--checkpoint", str(tiny_model_dir), "--data", str(orl), "--out", str(tmp_path / "orl.npz"),
                "--num-workers", "0", "--batch-size", "100"])
    e = load_embeddings(tmp_path / "orl.npz")
    upper = np.triu_indices(len(e["labels"]), k=1)  # every unordered pair once, scored independently here
    scores = (e["embeddings"] @ e["embeddings"].T)[upper]
    same = (e["labels"][:, None] == e["labels"][None, :])[upper]
    m = json.loads((tmp_path / "orl" / "metrics.json").read_text())
    assert m["n_embeddings"] == 400 and m["n_identities"] == 40
    assert m["verification"]["n_genuine"] == 40 * 45 and m["verification"]["n_impostor"] == 400 * 399 // 2 - 1800
    assert m["identification"]["gallery_size"] == 40 and m["identification"]["n_probes"] == 360
    assert m["verification"]["auc"] == pytest.approx(roc_auc_score(same, scores), abs=1e-3)
    assert "Olivetti" in (tmp_path / "orl" / "report.md").read_text()
    assert np.isfinite(m["identification"]["map_at_r"])
