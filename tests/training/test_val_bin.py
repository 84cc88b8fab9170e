"""Training with --val-bin: the .bin sets are scored at each validation, logged (metrics.jsonl, TensorBoard) as
bin/NAME/*, select best/ by bin:NAME, work with no val split at all, draw no random numbers (the run trains exactly
as one without them) and resume bitwise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from facesiam.commands.make_bin import main as make_bin_main
from facesiam.commands.make_pairs import main as make_pairs_main
from facesiam.commands.train import main

from ..conftest import reset_accelerate

TINY = ["--backbone", "test_efficientnet", "--embedding-dim", "32", "--image-size", "32", "--batch-size", "16",
        "--m-per-class", "4", "--num-workers", "0", "--wandb", "off", "--lr", "1e-3", "--scheduler", "cosine",
        "--head", "face", "--dropout", "0.2", "--epochs", "5"]  # dropout: a step that draws random numbers


@pytest.fixture(scope="module")
def heldout_bin(face_folder, tmp_path_factory) -> Path:
    """A .bin of 24 pairs of the synthetic held-out faces (48 px, resized to the field's 112)."""
    tmp = tmp_path_factory.mktemp("valbin")
    make_pairs_main([str(face_folder), "--out", str(tmp / "pairs.txt"), "--folds", "2", "--pairs-per-fold", "6"])
    make_bin_main([str(face_folder), str(tmp / "pairs.txt"), str(tmp / "heldout.bin"), "--resize"])
    return tmp / "heldout.bin"


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in load_file(str(path / "model.safetensors")).items()}


def _assert_same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_array_equal(wa[key], wb[key], err_msg=key)


def _bin_logs(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("bin/")} for r in rows if "bin/heldout/accuracy" in r}


def test_val_bin_alone_validates_selects_best_and_trains_like_no_validation(synthetic_shards, heldout_bin, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["--data", str(synthetic_shards), *TINY, "--val-split", "none", "--max-steps", "6"]
    # No val split and the default best_metric: validation runs on the .bin alone and selects by bin:heldout.
    summary = main([*common, "--output", str(tmp_path / "bin"), "--val-bin", str(heldout_bin),
                    "--val-every-steps", "2"])
    reset_accelerate()
    main([*common, "--output", str(tmp_path / "none")])
    # The .bin evaluation drew nothing from any RNG: dropout saw the same numbers as in a run that never validated.
    _assert_same(tmp_path / "bin" / "final", tmp_path / "none" / "final")
    logs = _bin_logs(tmp_path / "bin")
    assert {2, 4, 6} <= set(logs) and not _bin_logs(tmp_path / "none")
    for values in logs.values():
        assert 0 <= values["bin/heldout/accuracy"] <= 1 and values["bin/heldout/xnorm"] > 0
        assert {"bin/heldout/accuracy_std", "bin/heldout/auc", "bin/heldout/tar_at_far_1e-03"} <= set(values)
    accuracy = {step: v["bin/heldout/accuracy"] for step, v in sorted(logs.items())}
    best_step = max(accuracy, key=lambda s: (accuracy[s], -s))  # the first step that reached the best value
    info = json.loads((tmp_path / "bin" / "best" / "config.json").read_text())["export_info"]
    assert info["selected_by"] == "bin:heldout" and info["step"] == best_step == summary["best_step"]
    assert info["value"] == pytest.approx(accuracy[best_step]) and "heldout" in info["metrics"]["bin"]
    events = EventAccumulator(str(next((tmp_path / "bin" / "tensorboard").rglob("events.*")).parent)).Reload()
    assert "bin/heldout/accuracy" in events.Tags()["scalars"]


def test_val_bin_with_a_val_split_resumes_bitwise(synthetic_shards, heldout_bin, tmp_path):
    common = ["--data", str(synthetic_shards), *TINY, "--tensorboard", "false", "--max-steps", "8",
              "--val-bin", str(heldout_bin), "--val-every-steps", "2", "--best-metric", "bin:heldout"]
    straight = main([*common, "--output", str(tmp_path / "a")])
    reset_accelerate()
    main([*common, "--output", str(tmp_path / "b"), "--checkpoint-every-steps", "3"])
    reset_accelerate()
    resumed = main([*common, "--output", str(tmp_path / "c"), "--resume", str(tmp_path / "b" / "checkpoints" / "step-3")])
    assert straight["steps"] == resumed["steps"] == 8
    _assert_same(tmp_path / "a" / "final", tmp_path / "c" / "final")
    assert (resumed["best_step"], resumed["best_value"]) == (straight["best_step"], straight["best_value"])
    after = {s: v for s, v in _bin_logs(tmp_path / "a").items() if s > 3}
    assert after and after == _bin_logs(tmp_path / "c"), "the resumed run's .bin scores are the uninterrupted run's"
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert any("val/auc" in r and "bin/heldout/accuracy" in r for r in rows), "val split and .bin in one validation"


def test_best_metric_bin_needs_its_set_in_val_bin(synthetic_shards, heldout_bin, tmp_path):
    with pytest.raises(SystemExit, match=r"^train: best_metric bin:cfp_fp selects by the verification set cfp_fp.bin, "
                                         r"which val_bin does not list \(heldout\); add --val-bin PATH/cfp_fp.bin"):
        main(["--data", str(synthetic_shards), "--output", str(tmp_path / "x"), *TINY, "--val-bin", str(heldout_bin),
              "--best-metric", "bin:cfp_fp"])
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"junk")
    with pytest.raises(SystemExit, match=r"^train: .*bad.bin: not a .bin verification set"):
        main(["--data", str(synthetic_shards), "--output", str(tmp_path / "y"), *TINY, "--val-bin", str(bad),
              "--max-steps", "1"])
