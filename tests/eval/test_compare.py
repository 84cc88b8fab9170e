"""compare: cosine of two images with the model's eval preprocessing, and thresholds given or from a report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from facesiam.commands.compare import main
from facesiam.eval.compare import compare, decision_threshold, threshold_from_report
from facesiam.eval.embed import embed_images



def _images(folder):
    return sorted(str(p) for p in folder.rglob("*.png"))


def test_similarity_is_the_cosine_of_eval_embeddings(tiny_model_dir, face_folder):  # noqa: F811
    from facesiam.data.images import load_rgb
    from facesiam.model import eval_transform_for, load_exported

    a, b = _images(face_folder)[:2]
    result = compare(tiny_model_dir, a, b, device="cpu")
    model, cfg = load_exported(tiny_model_dir)
    t = eval_transform_for(cfg)
    with torch.no_grad():
        e = model(torch.stack([t(load_rgb(a)), t(load_rgb(b))])).numpy()
    assert result["similarity"] == pytest.approx(float(e[0] @ e[1]), abs=1e-5)
    assert result["threshold"] is None and result["same"] is None
    assert compare(tiny_model_dir, a, a, device="cpu")["similarity"] == pytest.approx(1.0, abs=1e-5)
    # --flip: the normalised mean of the image's and its mirror image's embeddings
    flip = embed_images(tiny_model_dir, [a], flip=True, device="cpu")[0]
    with torch.no_grad():
        views = model(torch.stack([t(load_rgb(a)), t(load_rgb(a).transpose(Image.FLIP_LEFT_RIGHT))])).numpy()
    mean = views.mean(axis=0)
    np.testing.assert_allclose(flip, mean / np.linalg.norm(mean), atol=1e-5)
    assert not np.allclose(flip, views[0], atol=1e-3)  # the mirror image counted: not the plain embedding


def _report(path, **verification):
    v = {"best_threshold": 0.5, "best_accuracy": 0.9, "eer_threshold": 0.6, "eer": 0.1,
         "threshold_at_far": {"1e-03": 0.8, "1e-06": None}, "tar_at_far": {"1e-03": 0.7, "1e-06": None},
         **verification}
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.json").write_text(json.dumps({"verification": v, "pairs": {"threshold": 0.55},
                                                   "source": {"checkpoint": "RUN/best"}}))
    return path


def test_thresholds_from_a_report(tmp_path):
    report = _report(tmp_path / "rep")
    assert threshold_from_report(report)[0] == 0.8  # the default: far=1e-3, what serve uses
    assert threshold_from_report(report, "best")[0] == 0.5
    value, source = threshold_from_report(report / "metrics.json", "far=1e-3")
    assert value == 0.8 and "1e-03" in source and "RUN/best" in source
    assert threshold_from_report(report, "eer")[0] == 0.6
    assert threshold_from_report(report, "pairs")[0] == 0.55
    with pytest.raises(ValueError, match="no threshold"):
        threshold_from_report(report, "far=1e-6")
    # Without an all-pairs threshold, 'best' falls back to the pairs protocol's; far=... names that way out.
    assert threshold_from_report(_report(tmp_path / "p", best_threshold=None), "best")[0] == 0.55
    with pytest.raises(ValueError, match="use --operating-point pairs"):
        threshold_from_report(_report(tmp_path / "q", threshold_at_far={}))
    # compare and serve decide through one function: a given threshold wins, else the report's, else none.
    assert decision_threshold(0.3, None) == (0.3, "given (--threshold)")
    assert decision_threshold(None, report)[0] == 0.8
    assert decision_threshold(None, report, "eer")[0] == 0.6
    assert decision_threshold(None, None) == (None, None)


def test_command_line_decision_and_errors(tiny_model_dir, face_folder, tmp_path, capsys):  # noqa: F811
    a, b = _images(face_folder)[:2]
    sim = compare(tiny_model_dir, a, b, device="cpu")["similarity"]
    # The default operating point is far=1e-3 (serve's): its threshold decides, not the best-accuracy one.
    report = _report(tmp_path / "rep", best_threshold=sim + 0.01, threshold_at_far={"1e-03": sim - 0.01})
    main(["--checkpoint", str(tiny_model_dir), a, b, "--report", str(report), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "SAME person" in out and str(report / "metrics.json") in out and "far=1e-3" in out
    main(["--checkpoint", str(tiny_model_dir), a, b, "--threshold", str(sim + 0.01), "--device", "cpu", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["same"] is False and result["threshold_source"] == "given (--threshold)"
    main(["--checkpoint", str(tiny_model_dir), a, b, "--device", "cpu"])
    assert "no threshold given" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not found"):
        main(["--checkpoint", str(tiny_model_dir), a, str(tmp_path / "missing.png"), "--device", "cpu"])
