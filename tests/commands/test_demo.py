"""`facesiam demo` end to end at a small size: the README's main job (synthetic faces -> shards -> training ->
report on held-out people), run exactly as a user runs it, then run again to check that it reuses its stages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from tests.conftest import run_python

SMALL = ["--identities", "24", "--images-per-identity", "8", "--val-identities", "6", "--max-steps", "4"]


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reports_on_people_it_never_saw(tmp_path):
    out = tmp_path / "demo"
    proc = run_python(["-m", "facesiam.commands.demo", "--out", str(out), *SMALL])
    assert "[5/5]" in proc.stdout and "done in" in proc.stdout, proc.stdout[-2000:]

    for name in ("report/report.md", "report/metrics.json", "run/best/model.safetensors", "run/summary.json",
                 "pairs.txt", "shards/dataset.json", "faces/synthetic.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["best_step"] is not None

    # The report is run/best evaluated on the 6 held-out identities: recompute its all-pairs AUC independently
    # (the library's embedding loop on the held-out split, sklearn's roc_auc_score over every pair).
    from facesiam.eval.embed import embed_path

    metrics = json.loads((out / "report" / "metrics.json").read_text())
    held_out = embed_path(out / "run" / "best", out / "shards", split="val", device="cpu", progress=False)
    emb, labels = held_out["embeddings"], np.asarray(held_out["labels"])
    assert len(set(labels.tolist())) == 6 and len(labels) == 6 * 8
    i, j = np.triu_indices(len(labels), k=1)
    # After 4 steps the network has barely moved from its start, where every cosine is ~0.9996-1.0: a span of a few
    # of the evaluator's histogram bins (2/2**16 wide, eval/verification.py), so scores are compared at that
    # resolution (pairs in one bin are ties, as in the evaluator), and computed in float32 as the evaluator does: at
    # ~13 occupied bins, float64 scores put enough pairs across a bin edge to move the AUC by 1e-3.
    unit = torch.nn.functional.normalize(torch.as_tensor(emb, dtype=torch.float32), dim=1)
    scores = (unit @ unit.T).numpy()[i, j]
    want = roc_auc_score(labels[i] == labels[j], np.floor((scores + np.float32(1)) / np.float32(2 / 2**16)))
    assert metrics["verification"]["auc"] == pytest.approx(want, abs=1e-3)
    assert "pairs" in metrics  # the LFW-style pairs file of step 4 was evaluated too

    # A second run reuses every stage: no new training steps, the same report numbers.
    again = run_python(["-m", "facesiam.commands.demo", "--out", str(out), *SMALL])
    assert "done in" in again.stdout
    assert json.loads((out / "run" / "summary.json").read_text())["steps"] == 4
    assert json.loads((out / "report" / "metrics.json").read_text())["verification"]["auc"] == pytest.approx(
        metrics["verification"]["auc"], abs=1e-6)
