"""Precision has one source of truth (training/setup.py resolve_precision): the launcher's, unless the run's config
names one, and then the two must agree."""

from __future__ import annotations

import json

import pytest
import yaml

from facesiam.config import TrainConfig
from facesiam.errors import InputError
from facesiam.training.setup import LAUNCHER_PRECISION, resolve_precision

from ..conftest import REPO, run_python

TINY = ["--backbone", "test_efficientnet", "--embedding-dim", "32", "--image-size", "32", "--batch-size", "16",
        "--m-per-class", "4", "--num-workers", "0", "--wandb", "off", "--val-split", "none", "--max-steps", "2"]


@pytest.mark.parametrize("config,launcher,expected", [
    (None, None, "no"), (None, "bf16", "bf16"), ("bf16", None, "bf16"), ("bf16", "bf16", "bf16"), ("no", "no", "no"),
])
def test_precision_follows_the_launcher_unless_the_config_names_the_same(config, launcher, expected, monkeypatch):
    if launcher is None:
        monkeypatch.delenv(LAUNCHER_PRECISION, raising=False)
    else:
        monkeypatch.setenv(LAUNCHER_PRECISION, launcher)
    assert resolve_precision(TrainConfig(mixed_precision=config)) == expected


def test_a_config_that_disagrees_with_the_launcher_is_refused_naming_both(monkeypatch):
    monkeypatch.setenv(LAUNCHER_PRECISION, "bf16")
    with pytest.raises(InputError, match="mixed_precision no in the run's config disagrees with the launcher's bf16"):
        resolve_precision(TrainConfig(mixed_precision="no"))


def test_accelerate_launch_with_a_bf16_config_trains_in_bf16(synthetic_shards, tmp_path):
    """The README's multi-GPU command, on CPU: a launcher config that says bf16 and a run config that says nothing
    must train in bf16 (it used to train in fp32: the config's 'no' silently won)."""
    launcher = yaml.safe_load((REPO / "accelerate_configs" / "cpu.yaml").read_text())
    launcher["mixed_precision"] = "bf16"
    (tmp_path / "bf16.yaml").write_text(yaml.safe_dump(launcher))
    out, run = tmp_path / "seen.json", tmp_path / "run"
    run_python(["-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "bf16.yaml"),
                "--main_process_port", "0", str(REPO / "tests" / "training" / "forward_dtype.py"), str(out),
                "--data", str(synthetic_shards), "--output", str(run), *TINY])
    seen = json.loads(out.read_text())
    assert seen == {"dtypes": ["torch.bfloat16"], "precision": "bf16", "recorded": "bf16"}
    assert yaml.safe_load((run / "config.yaml").read_text())["mixed_precision"] == "bf16"  # the record says what ran
