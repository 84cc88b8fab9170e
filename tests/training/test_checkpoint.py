"""Checkpoints and exports: best/ is the best step's model; --resume latest after kill -9 at any moment (during a
checkpoint save too) ends with the weights of an uninterrupted run."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from facesiam.commands.train import main

from ..conftest import REPO, SUBPROCESS_TIMEOUT, reset_accelerate

TINY = ["--backbone", "test_efficientnet", "--embedding-dim", "32", "--image-size", "32", "--batch-size", "16",
        "--m-per-class", "4", "--num-workers", "0", "--wandb", "off", "--tensorboard", "false", "--lr", "1e-3",
        "--scheduler", "cosine", "--head", "face", "--dropout", "0.2"]


def _weights(path: Path, prefix: str = "") -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v.numpy() for k, v in load_file(str(path / "model.safetensors")).items()
            if k.startswith(prefix)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_best_holds_exactly_the_weights_of_best_step(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    summary = main(["--data", str(synthetic_shards), "--output", str(run), *TINY, "--max-steps", "6",
                    "--val-every-steps", "1", "--checkpoint-every-steps", "1", "--keep-checkpoints", "10",
                    "--best-metric", "auc"])
    best = _weights(run / "best")
    matches = [s for s in range(1, 7) if _same(best, _weights(run / "checkpoints" / f"step-{s}", prefix="model."))]
    assert matches == [summary["best_step"]]
    import json

    exported = json.loads((run / "best" / "config.json").read_text())["export_info"]
    assert exported["step"] == summary["best_step"] and exported["value"] == pytest.approx(summary["best_value"])


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(REPO / "launch" / "train.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, deadline: float) -> bool:
    """kill -9 the run's process group as soon as ready() holds; False if the run ended first."""
    while proc.poll() is None and time.time() < deadline:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            return True
        time.sleep(0.002)
    if proc.poll() is None:  # hung: never leave it running
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the training run did not finish in time")
    return False


def _saving(run: Path):
    return lambda: any(p.name.startswith(".tmp-step-") for p in (run / "checkpoints").glob(".tmp-step-*"))


def _after_checkpoint_then_random_delay(run: Path, rng: random.Random):
    state = {"t": None}

    def ready():
        if state["t"] is None and (run / "checkpoints" / "step-2").is_dir():
            state["t"] = time.time() + rng.uniform(0.0, 1.0)
        return state["t"] is not None and time.time() >= state["t"]

    return ready


@pytest.mark.parametrize("moment", ["random", "during_checkpoint_save"])
def test_resume_latest_after_kill_9_finishes_like_an_uninterrupted_run(synthetic_shards, tmp_path, moment):
    common = ["--data", str(synthetic_shards), *TINY, "--max-steps", "14", "--epochs", "5", "--val-every-steps", "4",
              "--checkpoint-every-steps", "1", "--keep-checkpoints", "2"]
    straight = main([*common, "--output", str(tmp_path / "straight")])
    reset_accelerate()
    run = tmp_path / "killed"
    rng = random.Random(1234)
    for attempt in range(5):  # the save window is a few ms, and a fast run may end within the random delay
        ready = _saving(run) if moment == "during_checkpoint_save" else _after_checkpoint_then_random_delay(run, rng)
        proc = _start([*common, "--output", str(run)])
        if _kill_when(proc, ready, deadline=time.time() + SUBPROCESS_TIMEOUT) and not (run / "summary.json").exists():
            break
        shutil.rmtree(run, ignore_errors=True)  # it finished before the kill: start over
    else:
        pytest.fail("the run finished every time before it could be killed")
    assert not (run / "summary.json").exists(), "the run was killed before its end"
    resumed = main([*common, "--output", str(run), "--resume", "latest"])
    assert resumed["steps"] == straight["steps"] == 14
    assert _same(_weights(run / "final"), _weights(tmp_path / "straight" / "final"))
    assert _same(_weights(run / "checkpoints" / "step-14"), _weights(tmp_path / "straight" / "checkpoints" / "step-14"))
    assert resumed["best_step"] == straight["best_step"] and resumed["best_value"] == straight["best_value"]
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in
             (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), "the resumed log continues the checkpoint's, without the lost steps twice"
