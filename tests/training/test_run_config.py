"""A resumed run keeps its settings (training/run_config.py): changes outside a short list are refused in one line,
allowed ones are appended to RUN/config-history.yaml, and RUN/config.yaml keeps what the run started with."""

from __future__ import annotations

import pytest
import yaml

from facesiam.commands.train import main
from facesiam.config import TrainConfig
from facesiam.training.run_config import RESUME_MAY_CHANGE, changes

from ..conftest import reset_accelerate

TINY = ["--backbone", "test_efficientnet", "--embedding-dim", "32", "--image-size", "32", "--batch-size", "16",
        "--m-per-class", "4", "--num-workers", "0", "--wandb", "off", "--log-every-steps", "1", "--val-split", "none",
        "--lr", "1e-3"]


def test_resume_refuses_changed_settings_and_records_allowed_ones(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    common = ["--data", str(synthetic_shards), "--output", str(run), *TINY]
    main([*common, "--max-steps", "2", "--checkpoint-every-steps", "2"])
    first = (run / "config.yaml").read_bytes()
    reset_accelerate()
    # A new learning rate and a new embedding size: both named, nothing trained, nothing written.
    with pytest.raises(SystemExit) as refused:
        main([*common, "--max-steps", "3", "--resume", "latest", "--lr", "5e-3", "--embedding-dim", "16"])
    message = str(refused.value)
    assert "\n" not in message and "optim.lr 0.001 -> 0.005" in message and "model.embedding_dim 32 -> 16" in message
    assert "max_steps" not in message  # allowed: not listed among the refused
    assert (run / "config.yaml").read_bytes() == first and not (run / "config-history.yaml").exists()
    reset_accelerate()
    # Allowed changes: a longer run, another log cadence.
    summary = main([*common, "--max-steps", "3", "--resume", "latest", "--log-every-steps", "2"])
    assert summary["steps"] == 3
    assert (run / "config.yaml").read_bytes() == first  # never overwritten
    history = yaml.safe_load((run / "config-history.yaml").read_text())
    assert len(history) == 1 and history[0]["step"] == 2 and history[0]["checkpoint"].endswith("step-2")
    assert history[0]["changes"] == {"max_steps": [2, 3], "log_every_steps": [1, 2], "checkpoint_every_steps": [2, 0]}
    reset_accelerate()
    # The next resume compares with the settings the run last ran with (config.yaml + history): no change, no entry.
    main([*common, "--max-steps", "3", "--resume", "latest", "--log-every-steps", "2"])
    assert len(yaml.safe_load((run / "config-history.yaml").read_text())) == 1


def test_allowed_changes_are_the_ones_that_do_not_change_a_step():
    cfg = TrainConfig()
    changed = TrainConfig(max_steps=9, num_workers=7, output="elsewhere", val_every_steps=3)
    changed.optim.lr = 0.5
    changed.loss.loss = "arcface"
    diff = changes(cfg, changed)
    assert set(diff) == {"max_steps", "num_workers", "output", "val_every_steps", "optim.lr", "loss.loss"}
    assert {key for key in diff if key.split(".")[-1] not in RESUME_MAY_CHANGE} == {"optim.lr", "loss.loss"}


def test_a_resume_from_something_that_is_no_checkpoint_is_one_line(tmp_path):
    from facesiam.errors import InputError
    from facesiam.training.checkpoint import find_checkpoint

    empty = tmp_path / "step-3"
    empty.mkdir()
    with pytest.raises(InputError, match="not a complete facesiam checkpoint .no train_state.json"):
        find_checkpoint(tmp_path, str(empty))
    (empty / "custom_checkpoint_0.pkl").write_bytes(b"")  # what facesiam wrote before train_state.json
    with pytest.raises(InputError, match="written by an older facesiam"):
        find_checkpoint(tmp_path, str(empty))
    assert find_checkpoint(tmp_path, "latest") is None and find_checkpoint(tmp_path, None) is None
