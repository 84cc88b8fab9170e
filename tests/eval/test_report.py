"""The report directory: metrics.json comes first and survives any figure; separable scores still get a report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facesiam.commands.evaluate import main
from facesiam.eval import plots
from facesiam.eval.embed import save_embeddings


def _separable(tmp_path, identities: int = 40, per_identity: int = 5):
    """Every image of an identity is the same unit vector, identities are orthogonal: genuine 1, impostor 0."""
    labels = np.repeat(np.arange(identities), per_identity)
    emb = np.eye(identities, 64, dtype=np.float32)[labels]
    paths = [f"id{label}/{i}.png" for i, label in enumerate(labels)]
    return save_embeddings(tmp_path / "sep.npz", emb, labels, paths, [f"id{i}" for i in range(identities)])


def test_perfectly_separable_embeddings_get_their_report(tmp_path):
    metrics = main(["--embeddings", str(_separable(tmp_path)), "--out", str(tmp_path / "r")])
    v = metrics["verification"]
    assert v["auc"] == 1.0 and v["eer"] == 0.0 and metrics["identification"]["rank1"] == 1.0
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["verification"]["auc"] == 1.0
    assert saved["verification"]["average_precision"] == pytest.approx(1.0)
    for name in ("roc", "det", "pr", "score_hist", "cmc"):
        assert (tmp_path / "r" / f"{name}.png").stat().st_size > 0, name
    assert "![DET](det.png)" in (tmp_path / "r" / "report.md").read_text()


def test_a_figure_that_fails_is_replaced_and_the_numbers_are_kept(tmp_path, monkeypatch, caplog):
    def broken(metrics):
        raise ValueError("Data cannot be log-scaled because all values are <= 0.")

    monkeypatch.setitem(plots.FIGURES, "det", broken)
    with caplog.at_level("WARNING"):
        metrics = main(["--embeddings", str(_separable(tmp_path)), "--out", str(tmp_path / "r")])
    assert "figure det could not be drawn" in caplog.text
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["verification"]["auc"] == metrics[
        "verification"]["auc"]
    assert (tmp_path / "r" / "det.png").stat().st_size > 0 and (tmp_path / "r" / "report.md").is_file()


def test_metrics_json_is_written_before_any_figure(tmp_path, monkeypatch):
    seen = {}

    def spy(metrics, out_dir, names=None):
        seen["metrics_json_first"] = (out_dir / "metrics.json").is_file()
        return {}

    monkeypatch.setattr(plots, "save_figures", spy)
    main(["--embeddings", str(_separable(tmp_path)), "--out", str(tmp_path / "r")])
    assert seen == {"metrics_json_first": True}


def test_det_figure_of_separated_scores_says_why_it_is_empty():
    metrics = {"verification": {"roc": {"far": [0.0, 0.0, 1.0], "tar": [0.0, 1.0, 1.0]}, "eer": 0.0, "auc": 1.0}}
    fig = plots.det_figure(metrics)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any("perfectly separated" in t for t in texts)
    assert fig.axes[0].get_xscale() == "linear"
    plots.plt.close(fig)


@pytest.mark.parametrize("identities", [1])
def test_no_impostor_pairs_still_writes_metrics(tmp_path, identities):
    metrics = main(["--embeddings", str(_separable(tmp_path, identities=identities)), "--out", str(tmp_path / "r"),
                    "--protocol", "verification"])
    assert metrics["verification"]["n_impostor"] == 0 and (tmp_path / "r" / "metrics.json").is_file()
