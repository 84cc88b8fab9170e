"""Gradient accumulation: a window of two micro-batches is one step on their union; a partial window is dropped."""

from __future__ import annotations

import json

import torch

from facesiam.commands.train import config_from_args, main, parser
from facesiam.training import Trainer

from ..conftest import reset_accelerate

# A network without BatchNorm (GroupNorm) and a per-sample loss: the mean loss of 32 images is then exactly the mean
# of the two 16-image means, so accumulation must reproduce the big batch's step up to float round-off.
PER_SAMPLE = ["--backbone", "test_efficientnet_gn", "--embedding-dim", "16", "--image-size", "32", "--head", "linear",
              "--loss", "arcface", "--optimizer", "sgd", "--lr", "0.1", "--scheduler", "constant",
              "--m-per-class", "4", "--num-workers", "0", "--wandb", "off", "--tensorboard", "false",
              "--val-split", "none"]


def _trainer(shards, out, *flags) -> Trainer:
    return Trainer(config_from_args(parser().parse_args(["--data", str(shards), "--output", str(out), *PER_SAMPLE,
                                                         *flags])))


def test_two_accumulated_micro_batches_equal_one_batch_twice_the_size(synthetic_shards, tmp_path):
    accumulated = _trainer(synthetic_shards, tmp_path / "a", "--batch-size", "16", "--grad-accum-steps", "2")
    window = next(accumulated.data.windows(0))
    assert [len(images) for images, _ in window] == [16, 16]
    start = {k: v.clone() for k, v in accumulated.learner.state_dict().items()}
    accumulated.train_step(window)
    reset_accelerate()
    big = _trainer(synthetic_shards, tmp_path / "b", "--batch-size", "32")
    assert all(torch.equal(v, start[k]) for k, v in big.learner.state_dict().items()), "same initial weights"
    union = (torch.cat([images for images, _ in window]), torch.cat([labels for _, labels in window]))
    big.train_step([union])
    largest_move = 0.0
    for key, value in big.learner.state_dict().items():
        # float round-off of the two summation orders reaches ~3e-6 after lr 0.1; a wrong scale of the
        # accumulated gradient (a sum instead of a mean, a lost micro-batch) moves weights by ~1e-2
        torch.testing.assert_close(accumulated.learner.state_dict()[key], value, rtol=1e-4, atol=2e-5, msg=key)
        if value.is_floating_point():
            largest_move = max(largest_move, (value - start[key]).abs().max().item())
    assert largest_move > 1e-3, f"the step barely changed the weights ({largest_move:.2e}); the test cannot tell"
    assert accumulated.state.step == big.state.step == 1


def test_a_partial_window_at_the_epoch_end_is_dropped(synthetic_shards, tmp_path):
    probe = _trainer(synthetic_shards, tmp_path / "probe", "--batch-size", "16")
    batches = probe.data.sampler.steps_per_epoch()
    accumulation = next(a for a in (3, 4, 5) if batches % a)  # a window size that leaves a remainder
    reset_accelerate()
    trainer = _trainer(synthetic_shards, tmp_path / "t", "--batch-size", "16", "--grad-accum-steps", str(accumulation))
    windows = list(trainer.data.windows(0))
    assert len(windows) == batches // accumulation and all(len(w) == accumulation for w in windows)
    reset_accelerate()
    summary = main(["--data", str(synthetic_shards), "--output", str(tmp_path / "run"), *PER_SAMPLE, "--batch-size",
                    "16", "--grad-accum-steps", str(accumulation), "--epochs", "2", "--log-every-steps", "1"])
    assert summary["steps"] == 2 * (batches // accumulation) and summary["epochs_completed"] == 2
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0] * (batches // accumulation) + [1] * (batches // accumulation)
