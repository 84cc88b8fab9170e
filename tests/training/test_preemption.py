"""Preemption and elastic restarts (training/preemption.py; the scenario lives in tools/demo_elastic.py).

A SIGTERM stops the run after the step it arrived in, with a checkpoint of that step and exit status 143; sent to
one of two ranks, it stops both after the same step. Relaunched under torchrun, which restarts the group when one
worker is killed with SIGKILL, the run ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from facesiam.commands.train import main
from facesiam.training import Trainer
from facesiam.training.preemption import PREEMPTED_EXIT_CODE, shield_loader_workers

from ..conftest import load_tool, reset_accelerate

demo = load_tool("demo_elastic")
STEPS = 27  # 3 epochs of 9 steps (2 ranks x batch 8)


def test_sigterm_stops_after_its_step_with_a_checkpoint_and_resume_is_exact(synthetic_shards, tmp_path, monkeypatch):
    """One process, the signal sent from inside step 4: deterministic."""
    args = ["--data", str(synthetic_shards), *demo.TINY, "--max-steps", "12", "--val-split", "none"]
    straight = main([*args, "--output", str(tmp_path / "straight")])
    reset_accelerate()
    step_once = Trainer.train_step

    def step_then_sigterm(self, window):
        out = step_once(self, window)
        if self.state.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # handled between two bytecodes, before the step returns
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    run = tmp_path / "stopped"
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--output", str(run)])
    assert stopped.value.code == PREEMPTED_EXIT_CODE == 143
    assert signal.getsignal(signal.SIGTERM) is before, "the previous handler is back after training"
    assert demo.checkpoints(run) == [4] and demo.train_state(run, 4)["batches_in_epoch"] == 4  # mid-epoch
    assert not (run / "summary.json").exists() and not (run / "final").exists()
    monkeypatch.undo()
    reset_accelerate()
    resumed = main([*args, "--output", str(run), "--resume", "latest"])
    assert resumed["steps"] == straight["steps"] == 12
    assert demo.same_weights(run / "final", tmp_path / "straight" / "final")


class _Numbers(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.tensor([i])


@pytest.mark.parametrize("shielded", [False, True], ids=["bare", "shielded"])
def test_loader_workers_survive_a_sigterm_to_the_process_group(shielded):
    """torchrun and Slurm signal a rank's whole process group: its loader workers must not die of it."""
    loader = DataLoader(_Numbers(), batch_size=2, num_workers=2, timeout=60)
    if shielded:
        shield_loader_workers(loader)
    batches = iter(loader)
    seen = [next(batches), next(batches)]  # one batch from each worker: both have run their worker_init_fn

    def signal_workers_and_finish():
        for worker in batches._workers:
            os.kill(worker.pid, signal.SIGTERM)
        seen.extend(batches)

    if shielded:
        signal_workers_and_finish()
        assert torch.cat(seen).flatten().tolist() == list(range(64))
    else:  # what the shield is for: the loader breaks ("DataLoader worker ... exited unexpectedly", or a batch whose
        # worker died while handing it over: a refused connection, or one closed mid-handshake, EOFError)
        with pytest.raises((RuntimeError, ConnectionError, EOFError)) as broken:
            signal_workers_and_finish()
        assert broken.type is not RuntimeError or "DataLoader worker" in str(broken.value)


@pytest.fixture(scope="module")
def uninterrupted(synthetic_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("elastic") / "uninterrupted"
    assert demo.uninterrupted(synthetic_shards, run, STEPS) == [0, 0]
    return run


def test_sigterm_during_validation_lets_it_finish_then_checkpoints_and_exits_143(synthetic_shards, tmp_path,
                                                                                 monkeypatch):
    """The signal reaches the rank and its validation loader's workers (torchrun and Slurm signal the process group)
    while validation runs: the workers, shielded, deliver every batch; the rank validates, checkpoints, exits 143."""
    from torch.utils.data import get_worker_info

    from facesiam.data import ShardDataset
    from facesiam.training import validation

    read_sample = ShardDataset.__getitem__

    def read_under_sigterm(self, index):
        if get_worker_info() is not None:  # in a loader worker: the process group's signal reaches it
            os.kill(os.getpid(), signal.SIGTERM)
        return read_sample(self, index)

    run_validation = validation.Validator.run

    def validate_under_sigterm(self, model, state):
        os.kill(os.getpid(), signal.SIGTERM)  # and the rank itself, just as validation starts
        return run_validation(self, model, state)

    monkeypatch.setattr(ShardDataset, "__getitem__", read_under_sigterm)
    monkeypatch.setattr(validation.Validator, "run", validate_under_sigterm)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main(["--data", str(synthetic_shards), *demo.TINY, "--max-steps", "12", "--val-every-steps", "3",
              "--num-workers", "2", "--val-batch-size", "8", "--output", str(run)])
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert demo.checkpoints(run) == [3]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/auc" in r] == [3], "validation of step 3 finished and was logged"


@pytest.fixture(scope="module")
def preempted(synthetic_shards, tmp_path_factory):
    """Two ranks started as torchrun starts them; SIGTERM to rank 1 alone once step 2 is logged."""
    run = tmp_path_factory.mktemp("elastic") / "interrupted"
    return run, demo.sigterm_one_rank(synthetic_shards, run, STEPS, after_step=2, rank=1)


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(preempted):
    run, stop = preempted
    # Both exit 143 (a rank killed by the signal would read -15): rank 0 never got a signal.
    assert stop["exit_codes"] == [PREEMPTED_EXIT_CODE, PREEMPTED_EXIT_CODE], stop
    assert not stop["finished"]
    # One checkpoint, at the step both stopped after: mid-epoch, where the cadence saves none.
    assert stop["checkpoints"] == [stop["step"]] and 2 <= stop["step"] < 9, stop
    assert stop["epoch"] == 0 and stop["batch_in_epoch"] == stop["step"]


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_the_run_ends_like_an_uninterrupted_one(
        preempted, uninterrupted, synthetic_shards):
    run, stop = preempted
    seed = random.randrange(2**32)
    kill = demo.torchrun_kill_9(synthetic_shards, run, STEPS, random.Random(seed))
    why = f"seed {seed}, {kill}"
    assert kill["exit_code"] == 0, why
    # The relaunch continued from the preemption's checkpoint; after the kill -9, torchrun's restart from a newer one.
    assert len(kill["resumed_at"]) == 2 and kill["resumed_at"][0] == stop["step"] < kill["resumed_at"][1], why
    assert demo.same_weights(run / "final", uninterrupted / "final"), why
    last = f"checkpoints/step-{STEPS}"
    assert demo.same_weights(run / last, uninterrupted / last), why
