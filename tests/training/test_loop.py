"""Training end to end on CPU: 2 gloo processes, exact resume, resume across world sizes, non-finite losses, learning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from facesiam.commands.train import main
from facesiam.losses import Criterion
from facesiam.model import build_model

from ..conftest import REPO, accelerate_launch, reset_accelerate
TINY = ["--backbone", "test_efficientnet", "--embedding-dim", "32", "--image-size", "32", "--batch-size", "16",
        "--m-per-class", "4", "--num-workers", "0", "--wandb", "off", "--log-every-steps", "1"]


def _weights(ckpt: Path) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in load_file(str(ckpt / "model.safetensors")).items()}


@pytest.fixture(scope="module")
def ddp_run(synthetic_shards, tmp_path_factory) -> Path:
    """2 processes on gloo through `accelerate launch` with the repo's cpu.yaml."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    accelerate_launch(REPO / "launch" / "train.py", [
        "--data", str(synthetic_shards), "--output", str(run), *TINY, "--epochs", "2", "--lr", "1e-3",
        "--scheduler", "cosine", "--optimizer", "adamw", "--checkpoint-every-steps", "3", "--keep-checkpoints", "10"])
    return run


def test_two_processes_train_validate_and_export(ddp_run):
    summary = json.loads((ddp_run / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["steps"] > 0
    assert (ddp_run / "best" / "model.safetensors").is_file() and (ddp_run / "best" / "config.json").is_file()
    final = json.loads((ddp_run / "final" / "config.json").read_text())
    assert final["export_info"]["step"] == summary["steps"], "final/ holds the weights of the last step, whatever val said"
    records = [json.loads(line) for line in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if "val/auc" in r]
    assert len(vals) == 2, "one validation per epoch (the last doubles as the final one)"
    train_logs = [r for r in records if "loss" in r]
    assert train_logs and all(r["images_per_s"] > 0 for r in train_logs)
    # Both ranks counted: images/s in total is twice the per-process figure.
    assert train_logs[-1]["images_per_s"] == pytest.approx(2 * train_logs[-1]["images_per_s_per_process"])
    cfg = (ddp_run / "config.yaml").read_text()
    assert "test_efficientnet" in cfg
    assert (ddp_run / "checkpoints").is_dir() and list((ddp_run / "tensorboard").rglob("events.*"))


def _train_state(ckpt: Path) -> dict:
    """The TrainState a checkpoint holds (its train_state.json)."""
    from dataclasses import asdict

    from facesiam.training.checkpoint import read_train_state

    return asdict(read_train_state(ckpt))


def test_two_process_checkpoint_resumes_mid_epoch_on_one_process(ddp_run, synthetic_shards, tmp_path, caplog):
    from facesiam.data import DistributedPerClassSampler, ShardDataset

    mid = [c for c in sorted((ddp_run / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
           if _train_state(c)["batches_in_epoch"] > 0]
    assert mid, "the 2-process run saved a checkpoint in the middle of an epoch"
    state = _train_state(mid[0])
    assert (state["world_size"], state["batch_size"]) == (2, 16)
    with caplog.at_level("WARNING", logger="facesiam.train"):
        summary = main(["--data", str(synthetic_shards), "--output", str(tmp_path / "one"), *TINY, "--epochs", "2",
                        "--lr", "1e-3", "--scheduler", "cosine", "--resume", str(mid[0])])
    assert "mid-epoch" in caplog.text
    # The one process takes the epoch's images the 2 processes did not (every identity has 8 images, m = 4: an epoch
    # takes each image once, and the 2-process one leaves a chunk per rank over), 16 a step, then one whole epoch.
    labels = ShardDataset(synthetic_shards, "train").labels
    per_epoch = DistributedPerClassSampler(labels, 16, 4, num_replicas=1, rank=0).steps_per_epoch()
    assert per_epoch == len(labels) // 16
    rest = (len(labels) - state["batches_in_epoch"] * 2 * 16) // 16
    assert summary["epochs_completed"] == 2
    assert summary["steps"] == state["step"] + rest + per_epoch * (1 - state["epoch"])
    assert _train_state(tmp_path / "one" / "checkpoints" / f"step-{summary['steps']}")["earlier_stretches"] == []


@pytest.mark.slow
def test_a_run_with_loader_workers_exits_when_it_is_done(synthetic_shards, tmp_path):
    """The loader's workers persist across epochs and ignore SIGTERM (preemption.py); the run must still end them,
    or multiprocessing's exit handler (SIGTERM, then join) waits for them forever after "done"."""
    proc = accelerate_launch(REPO / "launch" / "train.py", [
        "--data", str(synthetic_shards), "--output", str(tmp_path / "run"), *TINY, "--num-workers", "1",
        "--max-steps", "2"], timeout=240)
    assert "done: 2 steps" in proc.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("augment", [["--augment-implementation", "torchvision"],
                                     ["--augment-implementation", "fused"],
                                     ["--augment-implementation", "fused", "--augment-device", "cpu"]],
                         ids=["torchvision", "fused", "fused-on-the-batch"])
def test_resume_is_exact(augment, synthetic_shards, tmp_path):
    common = ["--data", str(synthetic_shards), *TINY, "--lr", "1e-3", "--scheduler", "cosine", "--epochs", "5",
              "--num-workers", "2", "--dropout", "0.2", "--head", "face", "--val-split", "none", *augment]
    straight = main([*common, "--output", str(tmp_path / "a"), "--max-steps", "8"])
    reset_accelerate()
    main([*common, "--output", str(tmp_path / "b"), "--max-steps", "8", "--checkpoint-every-steps", "3"])
    # Throw away the end of run b and continue from its step-3 checkpoint (mid-epoch: an epoch is 4-5 steps).
    ckpt = tmp_path / "b" / "checkpoints" / "step-3"
    assert ckpt.is_dir()
    reset_accelerate()
    resumed = main([*common, "--output", str(tmp_path / "c"), "--max-steps", "8", "--resume", str(ckpt)])
    assert straight["steps"] == resumed["steps"] == 8
    a = _weights(tmp_path / "a" / "checkpoints" / "step-8")
    c = _weights(tmp_path / "c" / "checkpoints" / "step-8")
    assert a.keys() == c.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], c[key], err_msg=key)
    # And the resumed run really trained: weights moved away from the checkpoint it started from.
    start = _weights(ckpt)
    assert any(not np.array_equal(start[k], c[k]) for k in c)


def test_ema_exports_the_moving_average_of_the_weights_and_resumes_it(synthetic_shards, tmp_path):
    common = ["--data", str(synthetic_shards), *TINY, "--lr", "1e-2", "--scheduler", "constant", "--epochs", "5",
              "--val-split", "none", "--max-steps", "6", "--ema-decay", "0.6"]
    main([*common, "--output", str(tmp_path / "a"), "--checkpoint-every-steps", "1", "--keep-checkpoints", "10"])
    # The live weights after each step, from the checkpoints; the average computed here with timm's decay warm-up
    # (step s: min(ema_decay, 1 - s^(-2/3)); the first step copies the weights).
    live = [_weights(tmp_path / "a" / "checkpoints" / f"step-{s}") for s in range(1, 7)]
    prefix = "model."
    expected = {k[len(prefix):]: v.astype(np.float64) for k, v in live[0].items() if k.startswith(prefix)}
    for s, w in enumerate(live[1:], start=2):
        d = min(0.6, 1 - s ** (-2 / 3))
        for k in expected:
            expected[k] = d * expected[k] + (1 - d) * w[prefix + k]
    final = _weights(tmp_path / "a" / "final")
    floats = [k for k in expected if "num_batches_tracked" not in k]
    assert set(floats) <= set(final)
    for k in floats:
        np.testing.assert_allclose(final[k], expected[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert any(not np.allclose(final[k], live[-1][prefix + k]) for k in floats), "the average is not the live model"
    # Resuming mid-run continues the same average: final/ equals the uninterrupted run's.
    reset_accelerate()
    main([*common, "--output", str(tmp_path / "b"), "--resume", str(tmp_path / "a" / "checkpoints" / "step-3")])
    resumed = _weights(tmp_path / "b" / "final")
    for k in floats:
        np.testing.assert_array_equal(resumed[k], final[k], err_msg=k)


def test_non_finite_loss_is_skipped_then_stops(synthetic_shards, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = Criterion.forward

    def flaky(self, embeddings, labels):
        calls["n"] += 1
        loss, value = original(self, embeddings, labels)
        if calls["n"] in (2, 3):
            return loss * float("nan"), value * float("nan")
        return loss, value

    monkeypatch.setattr(Criterion, "forward", flaky)
    args = ["--data", str(synthetic_shards), *TINY, "--max-steps", "6", "--val-split", "none"]
    summary = main([*args, "--output", str(tmp_path / "flaky")])
    assert summary["skipped_steps"] == 2 and summary["steps"] == 6
    final = _weights(tmp_path / "flaky" / "checkpoints" / "step-6")
    assert all(np.isfinite(v).all() for v in final.values())

    def always_nan(self, embeddings, labels):
        loss, value = original(self, embeddings, labels)
        return loss * float("nan"), value * float("nan")

    monkeypatch.setattr(Criterion, "forward", always_nan)
    reset_accelerate()
    with pytest.raises(SystemExit, match="^train: 3 consecutive steps"):
        main([*args, "--output", str(tmp_path / "nan"), "--max-nonfinite-steps", "3"])


def test_training_beats_random_init(synthetic_shards, tmp_path):
    from facesiam.data import ShardDataset
    from facesiam.eval.embed import embed_dataset
    from facesiam.eval.metrics import evaluate_embeddings
    from facesiam.model import eval_transform_for, load_exported

    run = tmp_path / "learn"
    main(["--data", str(synthetic_shards), "--output", str(run), *TINY, "--epochs", "12", "--lr", "3e-3",
          "--scheduler", "cosine", "--loss", "arcface", "--margin", "20", "--scale", "16", "--head", "face",
          "--class-lr-mult", "10"])
    trained, cfg = load_exported(run / "best")
    torch.manual_seed(123)
    random_init = build_model(cfg)
    val = ShardDataset(synthetic_shards, "val", transform=eval_transform_for(cfg))
    aucs = {}
    for name, model in (("trained", trained), ("random", random_init.eval())):
        emb, labels = embed_dataset(model, val, batch_size=64, progress=False)
        aucs[name] = evaluate_embeddings(emb, labels)["verification"]["auc"]
    assert aucs["trained"] > aucs["random"] + 0.1, aucs


def test_imprinted_centres_start_training_at_a_lower_loss(synthetic_shards, tmp_path):
    first_loss = {}
    for init in ("random", "imprint"):
        reset_accelerate()
        run = tmp_path / init
        main(["--data", str(synthetic_shards), "--output", str(run), *TINY, "--max-steps", "1", "--val-split", "none",
              "--loss", "subcenter_arcface", "--margin", "20", "--scale", "16", "--head", "face",
              "--init-centres", init])
        first_loss[init] = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    # Same seed, same weights, same first batch: only the centres differ.
    assert first_loss["imprint"] < first_loss["random"] - 0.5, first_loss


def test_two_processes_imprint_the_centres_of_the_global_batch(synthetic_shards, tmp_path):
    """Each rank embeds its slice of every batch; the gathered means must match one process on the same plan."""
    flags = ["--data", str(synthetic_shards), "--backbone", "test_efficientnet", "--embedding-dim", "32",
             "--image-size", "32", "--m-per-class", "4", "--num-workers", "0", "--wandb", "off", "--max-steps", "1",
             "--lr", "1e-12", "--val-split", "none", "--loss", "subcenter_arcface", "--init-centres", "imprint"]
    accelerate_launch(REPO / "launch" / "train.py", [*flags, "--output", str(tmp_path / "two"), "--batch-size", "16"])
    # One process, batch 32 = 2 x 16: the sampler plans the same steps, so the same images are embedded (BatchNorm
    # statistics then come from 32 images instead of 16, hence "close", not "equal").
    main([*flags, "--output", str(tmp_path / "one"), "--batch-size", "32"])
    reset_accelerate()
    main([*flags, "--output", str(tmp_path / "rand"), "--batch-size", "32", "--init-centres", "random"])

    def centres(run):
        w = torch.from_numpy(_weights(run / "checkpoints" / "step-1")["criterion.loss.W"])
        return torch.nn.functional.normalize(w, dim=0)

    two, one, rand = centres(tmp_path / "two"), centres(tmp_path / "one"), centres(tmp_path / "rand")
    # Sub-centre 0 of every imprinted class (the label space also holds the 6 val identities, never imprinted).
    trained = [c for c in range(two.shape[1] // 3) if not torch.allclose(one[:, 3 * c], rand[:, 3 * c])]
    assert len(trained) == 18
    cross = two[:, [3 * c for c in trained]].t() @ one[:, [3 * c for c in trained]]  # class x class cosines
    # Each class's 2-process centre is nearest to the same class's 1-process centre: labels stayed with their rows.
    assert torch.equal(cross.argmax(1), torch.arange(len(trained))), cross
    assert cross.diagonal().mean() > 0.7


@pytest.mark.slow
def test_partial_fc_trains_on_two_processes_resumes_exactly_and_reshards_onto_one(synthetic_shards, tmp_path):
    """Partial FC (centres sharded over 2 gloo ranks, half the negatives sampled): a resumed run ends with exactly
    the weights of an uninterrupted one (each rank's centres and their AdamW state come back from its own file),
    and the 2-rank checkpoint resumes on one process with the centres laid end to end."""
    flags = ["--data", str(synthetic_shards), *TINY, "--lr", "1e-3", "--val-split", "none", "--loss", "arcface",
             "--margin", "20", "--scale", "16", "--partial-fc", "0.5", "--max-steps", "4", "--epochs", "5"]
    accelerate_launch(REPO / "launch" / "train.py", [*flags, "--output", str(tmp_path / "a"),
                                                     "--checkpoint-every-steps", "2"])
    step2 = tmp_path / "a" / "checkpoints" / "step-2"
    shards = [torch.load(step2 / f"centres-{r}-of-2.pt", weights_only=True) for r in range(2)]
    assert "criterion.loss.loss.W" not in _weights(step2)  # the centres live in the per-rank files only
    accelerate_launch(REPO / "launch" / "train.py", [*flags, "--output", str(tmp_path / "b"), "--resume", str(step2)])
    a, b = _weights(tmp_path / "a" / "checkpoints" / "step-4"), _weights(tmp_path / "b" / "checkpoints" / "step-4")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for r in range(2):
        want = torch.load(tmp_path / "a" / "checkpoints" / "step-4" / f"centres-{r}-of-2.pt", weights_only=True)
        got = torch.load(tmp_path / "b" / "checkpoints" / "step-4" / f"centres-{r}-of-2.pt", weights_only=True)
        assert torch.equal(want["weight"], got["weight"]) and torch.equal(want["optimizer"]["exp_avg_sq"],
                                                                            got["optimizer"]["exp_avg_sq"])
        assert not torch.equal(want["weight"], shards[r]["weight"]), "the centres trained"
    # one process, from the 2-rank checkpoint: every class's centre, in order, then it trains on
    reset_accelerate()
    summary = main([*flags, "--output", str(tmp_path / "one"), "--resume", str(step2), "--max-steps", "3"])
    assert summary["steps"] == 3
    one = torch.load(tmp_path / "one" / "checkpoints" / "step-3" / "centres-0-of-1.pt", weights_only=True)
    classes = shards[0]["num_classes"]
    assert one["weight"].shape == (32, classes) and one["world_size"] == 1
