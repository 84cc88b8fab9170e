"""Checkpoints and exports: best/ is the best step's model; --resume latest after kill -9 at any moment (during a
checkpoint save too) ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
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
import torch
from safetensors.torch import load_file

from facesiam.commands.train import main

from ..conftest import REPO, SUBPROCESS_TIMEOUT, accelerate_launch, reset_accelerate

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


# ------------------------------------------------------------------------------------------ elastic resize 2 -> 1 -> 2

def test_resume_state_records_an_epochs_stretches_across_resizes():
    from facesiam.training.checkpoint import TrainState, resume_state

    asked = []

    def steps_left(epoch, earlier, batch):
        asked.append((epoch, [list(s) for s in earlier], batch))
        return 5

    state = TrainState(step=12, epoch=1, batches_in_epoch=3, world_size=2, batch_size=8)
    assert resume_state(state, 2, 8, steps_left, 9, 2) == 1.0 and not asked, "same size: exact, nothing changes"
    assert resume_state(state, 1, 8, steps_left, 18, 2) == 2.0
    assert (state.earlier_stretches, state.batches_in_epoch, state.world_size) == ([[2, 8, 3]], 0, 1)
    assert asked[-1] == (1, [[2, 8, 3]], 0) and state.steps_offset == 12 + 5 - 2 * 18
    # Back on 2 processes before the one process took a step: the 2-process stretch's own plan goes on.
    assert resume_state(state, 2, 8, steps_left, 9, 2) == 0.5
    assert (state.earlier_stretches, state.batches_in_epoch, state.world_size) == ([], 3, 2)
    assert asked[-1] == (1, [], 3)


def _traced(folder: Path) -> list[dict]:
    """The windows the processes trained on ($FACESIAM_TRACE_SAMPLES: one JSON line per window per process)."""
    return [json.loads(line) for f in sorted(folder.glob("samples-*.jsonl")) for line in f.read_text().splitlines()]


PARTIAL_FC = ["--loss", "arcface", "--margin", "20", "--scale", "16", "--partial-fc", "0.5"]


@pytest.mark.slow
@pytest.mark.parametrize("accumulation, loss", [(1, []), (2, []), (1, PARTIAL_FC), (1, ["--teacher", "ONNX"])],
                         ids=["plain", "accumulation-2", "partial-fc", "distillation"])
def test_elastic_resize_2_1_2_trains_each_sample_of_the_epoch_once(synthetic_shards, tmp_path, monkeypatch,
                                                                   accumulation, loss):
    """2 gloo ranks stop at step 3 of a 9-step epoch, the run resumes on one process to step 7, then on 2 ranks to the
    epoch's end. Every training identity has 8 images and m = 4, so an epoch takes each image exactly once: the
    per-sample trace must hold each image of the train split once, none twice, none left out. With accumulation 2
    each step is two micro-batches of 4 per process (the same 8 images a step), so the same steps hold. With Partial
    FC the class centres go from 2 shards to 1 and back to 2. With distillation (an ONNX teacher) the targets come
    from the teacher's cache, filled by the first 2 ranks and read by every later stretch."""
    from facesiam.data import ShardDataset
    from facesiam.training.checkpoint import read_train_state

    if "ONNX" in loss:
        from tests.training.test_distill import _teacher_onnx

        loss = ["--teacher", f"onnx:{_teacher_onnx(tmp_path)}"]
        synthetic_shards = shutil.copytree(synthetic_shards, tmp_path / "shards")  # its teacher cache is this test's

    trace, run = tmp_path / "trace", tmp_path / "run"
    env = {"FACESIAM_TRACE_SAMPLES": str(trace)}
    args = ["--data", str(synthetic_shards), "--output", str(run), *TINY, "--batch-size", str(8 // accumulation),
            "--grad-accum-steps", str(accumulation), "--epochs", "1", "--val-split", "none",
            "--checkpoint-every-steps", "0", "--keep-checkpoints", "5", "--resume", "latest", *loss]
    accelerate_launch(REPO / "launch" / "train.py", [*args, "--max-steps", "3"], env=env)
    monkeypatch.setenv("FACESIAM_TRACE_SAMPLES", str(trace))
    one = main([*args, "--max-steps", "7"])
    accelerate_launch(REPO / "launch" / "train.py", [*args, "--max-steps", "100"], env=env)

    state = read_train_state(run / "checkpoints" / "step-7")
    assert one["steps"] == 7 and (state.world_size, state.batches_in_epoch) == (1, 4 * accumulation)
    assert state.earlier_stretches == [[2, 8 // accumulation, 3 * accumulation]]
    windows = _traced(trace)
    assert sorted({(w["stretch"], w["world_size"]) for w in windows}) == [(0, 2), (1, 1), (2, 2)]
    assert sum(w["world_size"] == 1 for w in windows) == 4 and sum(w["world_size"] == 2 for w in windows) == 2 * 7
    seen = [i for w in windows for i in w["indices"]]
    assert sorted(seen) == list(range(len(ShardDataset(synthetic_shards, "train"))))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 11 and summary["epochs_completed"] == 1
    if loss == PARTIAL_FC:  # the one process's centres, dealt back onto 2 ranks, trained on: each rank's shard saved
        one = torch.load(run / "checkpoints" / "step-7" / "centres-0-of-1.pt", weights_only=True)
        last = sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
        two = [torch.load(last / f"centres-{r}-of-2.pt", weights_only=True) for r in range(2)]
        classes = one["num_classes"]
        merged = torch.cat([t["weight"] for t in two], dim=1)[:, :classes]
        assert merged.shape == one["weight"].shape and not torch.equal(merged, one["weight"]), "trained after 1 -> 2"
