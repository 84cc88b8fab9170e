"""The training loop: Accelerate (DDP, mixed precision, accumulation), per-class sampling, exact resume, validation.

    accelerate launch --config_file accelerate_configs/cpu.yaml launch/train.py --data SHARDS --output RUN
    python launch/train.py --data SHARDS --output RUN --config launch/configs/seed.yaml --max-steps 100

One loop, read top to bottom: build data, model, loss, optimizer; prepare with Accelerate; for each step
forward -> loss (fp32) -> backward -> clip -> step; validate with the evaluator's metrics and export the best
model; save resumable checkpoints. Everything needed to resume is explicit: the model, optimizer, scheduler
(and scaler) states that Accelerate saves, plus ``TrainState`` (step, epoch, position in the epoch, best metric).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .config import TrainConfig, add_config_arguments, config_from_args, save_yaml, to_dict
from .data.sampler import DistributedPerClassSampler
from .losses import Criterion
from .model import EmbeddingModel, batch_statistics, build_model, export_model

log = logging.getLogger("facesiam.train")


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainState:
    """The loop's own position, saved with every checkpoint (Accelerate saves model/optimizer/scheduler/RNG)."""

    step: int = 0                 # optimizer steps taken
    epoch: int = 0                # current epoch (0-based)
    batches_in_epoch: int = 0     # sampler batches already consumed in this epoch (the sampler position)
    world_size: int = 1           # processes that wrote this state (to map the position onto another world size)
    batch_size: int = 0           # per-process batch size that wrote this state
    skipped_steps: int = 0        # optimizer steps skipped for a non-finite loss/gradient, in total
    best_value: Optional[float] = None  # best validation value of cfg.best_metric so far
    best_step: Optional[int] = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class MetricLearner(nn.Module):
    """The module handed to DDP: embedding model + criterion, so class centres are synchronised like weights."""

    def __init__(self, model: EmbeddingModel, criterion: Criterion):
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.model(images)
        # Losses in fp32: margins of 0.1 in cosine and logit scales of 64 do not survive bf16/fp16.
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.criterion(embeddings.float(), labels)


# ----------------------------------------------------------------------------------------------- building blocks

def build_optimizer(cfg: TrainConfig, learner: MetricLearner) -> torch.optim.Optimizer:
    """AdamW / SGD / schedule-free AdamW over trunk, head and class centres (trunk and centres with lr multipliers)."""
    o = cfg.optim

    def trainable(module: nn.Module) -> list[nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad]

    # The head's group comes first: it runs at the base lr, which is what the logs report as "lr".
    # Each group is named so the scheduler can find the trunk's without relying on this order.
    groups = [{"name": "head", "params": trainable(learner.model.head), "lr": o.lr},
              {"name": "trunk", "params": trainable(learner.model.trunk), "lr": o.lr * o.trunk_lr_mult}]
    centres = trainable(learner.criterion)
    if centres:
        groups.append({"name": "centres", "params": centres, "lr": o.lr * cfg.loss.class_lr_mult})
    if o.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, eps=o.eps)
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)
    try:
        import schedulefree
    except ImportError:
        raise SystemExit("optimizer schedulefree_adamw needs the schedulefree package: pip install schedulefree") from None
    return schedulefree.AdamWScheduleFree(groups, lr=o.lr, weight_decay=o.weight_decay, eps=o.eps,
                                          warmup_steps=o.warmup_steps)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """Return (scheduler or None, when it steps: 'step' | 'epoch' | 'validation')."""
    o = cfg.optim
    if cfg.optim.optimizer == "schedulefree_adamw":
        return None, "none"
    if o.scheduler == "cosine_epoch":  # the seed article's CosineAnnealingLR, stepped once per epoch
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=o.t_max, eta_min=o.eta_min), "epoch"
    if o.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=o.step_size, gamma=o.gamma), "epoch"
    if o.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=o.gamma,
                                                          patience=o.patience), "validation"
    warm = max(0, o.warmup_steps)
    floor = o.eta_min / o.lr if o.lr > 0 else 0.0

    def factor(step: int, start: int = 0) -> float:
        """Linear warm-up from `start` (0 before it), then constant (with an optional linear cooldown to eta_min over
        the last cooldown_steps) or cosine decay to eta_min over the whole run."""
        if step < start:
            return 0.0
        ramp = min(1.0, (step - start + 1) / warm) if warm else 1.0
        if o.scheduler == "constant":
            left = max(1, total_steps - step)  # steps still to run, this one included
            if not o.cooldown_steps or left > o.cooldown_steps:
                return ramp
            return ramp * (floor + (1 - floor) * (left - 1) / o.cooldown_steps)
        progress = min(1.0, max(0, step - warm) / max(1, total_steps - warm))
        return ramp * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    # One factor per optimizer group. A frozen trunk gets lr 0 rather than requires_grad=False: DDP's set of
    # parameters with gradients must not change mid-run, and AdamW with lr 0 leaves the weights exactly as they are
    # (its decay is lr * weight_decay).
    def trunk_factor(step: int) -> float:
        return factor(step, o.trunk_frozen_steps)

    factors = [trunk_factor if g.get("name") == "trunk" else factor for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors), "step"


def _metric_value(metrics: dict, name: str) -> Optional[float]:
    v, i = metrics.get("verification", {}), metrics.get("identification", {})
    value = {
        "tar_at_far_1e-03": v.get("tar_at_far", {}).get("1e-03"),
        "auc": v.get("auc"),
        "neg_eer": None if v.get("eer") is None else -v["eer"],
        "rank1": i.get("rank1"),
        "map_at_r": i.get("map_at_r"),
    }[name]
    return None if value is None else float(value)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _checkpoints(run: Path) -> list[Path]:
    ckpts = [p for p in (run / "checkpoints").glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(ckpts, key=lambda p: int(p.name[5:]))


def resolve_resume(cfg: TrainConfig) -> Optional[Path]:
    """--resume latest|PATH -> a checkpoint directory (None: start fresh)."""
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        ckpts = _checkpoints(Path(cfg.output))
        if not ckpts:
            log.warning("--resume latest: no checkpoint in %s/checkpoints; starting from scratch", cfg.output)
            return None
        return ckpts[-1]
    path = Path(cfg.resume)
    if not (path / "custom_checkpoint_0.pkl").exists() and not any(path.glob("*.safetensors")):
        raise SystemExit(f"--resume {path}: not a facesiam checkpoint directory (RUN/checkpoints/step-N)")
    return path


def imprint_centres(accelerator, learner: MetricLearner, loader: DataLoader, sampler: DistributedPerClassSampler,
                    cfg: TrainConfig) -> None:
    """Start each class centre at its class's mean embedding over one epoch of the training batches.

    The embeddings are the ones the loss would see at step 0: the same sampler (epoch 0), augmentation and batch
    size, BatchNorm on batch statistics; batch statistics over a batch of P identities differ from running ones,
    which matters most for the face head's BatchNorm, still at its initial running averages here.
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    chunks, labels = [], []
    sampler.set_epoch(0)
    with batch_statistics(learner.model), torch.inference_mode(), accelerator.autocast():
        for images, batch_labels in tqdm(loader, desc="imprint centres", disable=not accelerator.is_main_process,
                                         leave=False):
            images = images.to(accelerator.device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            chunks.append(learner.model(images).float())
            labels.append(batch_labels.to(accelerator.device))
    # Every rank has the same number of batches of the same size (the sampler guarantees it), so a plain gather.
    embeddings, labels = accelerator.gather(torch.cat(chunks)), accelerator.gather(torch.cat(labels))
    count = learner.criterion.imprint_centres(embeddings, labels)
    seconds = time.time() - t0
    log.info("imprinted the centres of %d classes from %d training images in %.1fs (%.1f img/s)", count,
             len(labels), seconds, len(labels) / max(seconds, 1e-9))


# ----------------------------------------------------------------------------------------------- logging

class RunLogger:
    """metrics.jsonl plus the Accelerate trackers (TensorBoard, W&B); main process only."""

    def __init__(self, accelerator, cfg: TrainConfig, run: Path):
        self.accelerator = accelerator
        self.path = run / "metrics.jsonl"
        trackers = []
        if cfg.tensorboard:
            from accelerate.tracking import TensorBoardTracker

            trackers.append(TensorBoardTracker("tensorboard", run))
        mode = cfg.wandb or os.environ.get("WANDB_MODE", "offline")
        if mode not in ("off", "disabled"):
            from accelerate.tracking import WandBTracker

            # Offline unless the user opts in: face data is biometric, and a run must not need a key.
            trackers.append(WandBTracker(cfg.wandb_project, mode=mode, dir=str(run), name=run.name,
                                         config=to_dict(cfg)))
        self.accelerator.log_with = trackers
        if trackers:
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in _flat(to_dict(cfg)).items()}
            accelerator.init_trackers(cfg.wandb_project, config=flat)

    def log(self, values: dict[str, Any], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and v is not None}
        if self.accelerator.trackers:
            self.accelerator.log(scalars, step=step)

    def log_figure(self, name: str, figure, step: int) -> None:
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_figure(name, figure, step)
            elif tracker.name == "wandb":
                import wandb

                tracker.run.log({name: wandb.Image(figure)}, step=step)


# ----------------------------------------------------------------------------------------------- the run

def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training as configured; returns a summary (steps, best metric, paths)."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, set_seed

    from .data import ShardDataset, build_eval_transform, build_train_transform

    if not cfg.data or not cfg.output:
        raise SystemExit("train: --data SHARDS and --output RUN are required")
    if not (Path(cfg.data) / "dataset.json").is_file():
        raise SystemExit(f"{cfg.data}: no dataset.json; make shards first: python tools/make_shards.py FACES/ {cfg.data}")
    use_cuda = torch.cuda.is_available()
    if cfg.mixed_precision == "fp16" and not use_cuda:
        raise SystemExit("mixed_precision fp16 needs CUDA (fp16 autocast does nothing on CPU); use bf16 or no")
    accelerator = Accelerator(cpu=not use_cuda, mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.grad_accum_steps)
    main_proc = accelerator.is_main_process
    logging.basicConfig(level=logging.INFO if main_proc else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file save messages drown the run's own log
    run = Path(cfg.output)
    if main_proc:
        run.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run / "config.yaml")
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)

    # --- data
    m = cfg.model
    train_tf = build_train_transform(m.image_size, crop_scale=cfg.augment.crop_scale, rotation=cfg.augment.rotation,
                                     hflip=cfg.augment.hflip, color_jitter=cfg.augment.color_jitter,
                                     center_crop=m.center_crop, mean=m.mean, std=m.std)
    train_ds = ShardDataset(cfg.data, cfg.train_split, transform=train_tf)
    splits = json.loads((Path(cfg.data) / "dataset.json").read_text(encoding="utf-8")).get("splits", {})
    val_ds = None
    if cfg.val_split in splits:
        val_ds = ShardDataset(cfg.data, cfg.val_split, transform=build_eval_transform(
            m.image_size, center_crop=m.center_crop, mean=m.mean, std=m.std))
    elif cfg.val_split.lower() != "none":
        log.warning("no '%s' split in %s: no validation; best/ will hold the final model "
                    "(make shards with --val-identities to validate on held-out people)", cfg.val_split, cfg.data)
    sampler = DistributedPerClassSampler(train_ds.labels, cfg.batch_size, cfg.m_per_class,
                                         num_replicas=accelerator.num_processes, rank=accelerator.process_index,
                                         seed=cfg.seed)
    # Own generator: creating a loader iterator must not draw from the global RNG, or a resumed run diverges.
    loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.num_workers, pin_memory=use_cuda,
                        generator=torch.Generator().manual_seed(cfg.seed),
                        persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)

    # --- model, loss, optimizer, schedule
    model = build_model(m)  # fails here, before any training, when pretrained weights are unreachable
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model = torch.compile(model)
    criterion = Criterion(cfg.loss, m.embedding_dim, num_classes=len(train_ds.classes))
    learner = MetricLearner(model, criterion)
    optimizer = build_optimizer(cfg, learner)
    steps_per_epoch = sampler.steps_per_epoch() // cfg.grad_accum_steps
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, steps_per_epoch * cfg.epochs)
    scheduler, scheduler_unit = build_scheduler(cfg, optimizer, total_steps)
    # The loader is not prepared: the sampler already shards batches across ranks and keeps its own position.
    # The scheduler is not prepared either: AcceleratedScheduler would step it once per process.
    learner, optimizer = accelerator.prepare(learner, optimizer)
    state = TrainState(world_size=accelerator.num_processes, batch_size=cfg.batch_size)
    accelerator.register_for_checkpointing(state)
    if scheduler is not None:
        accelerator.register_for_checkpointing(scheduler)
    network = accelerator.unwrap_model(learner).model  # the embedding network being trained
    ema = None
    if cfg.optim.ema_decay:
        from timm.utils import ModelEmaV3

        # Every rank keeps the same average (DDP keeps the weights equal), so nothing is communicated; it is part of
        # the checkpoint, so a resumed run continues the same average.
        ema = ModelEmaV3(network, decay=cfg.optim.ema_decay, use_warmup=True)
        accelerator.register_for_checkpointing(ema)
    evaluated = ema.module if ema is not None else network  # what validation scores and best/ and final/ hold

    resume_from = resolve_resume(cfg)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        if (state.world_size, state.batch_size) != (accelerator.num_processes, cfg.batch_size) and state.batches_in_epoch:
            seen = state.batches_in_epoch * state.world_size * state.batch_size
            new_pos = seen // (accelerator.num_processes * cfg.batch_size)
            log.warning("resuming a %d-process checkpoint on %d processes mid-epoch: the epoch continues at batch %d "
                        "of a re-planned epoch (exact resume needs the same world size)",
                        state.world_size, accelerator.num_processes, new_pos)
            state.batches_in_epoch = int(new_pos)
        state.world_size, state.batch_size = accelerator.num_processes, cfg.batch_size
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, state.step, state.epoch,
                 state.batches_in_epoch)

    if cfg.loss.init_centres == "imprint" and resume_from is None:
        imprint_centres(accelerator, accelerator.unwrap_model(learner), loader, sampler, cfg)

    logger = RunLogger(accelerator, cfg, run) if main_proc else None
    if not main_proc:
        accelerator.log_with = []
    n_params = sum(p.numel() for p in accelerator.unwrap_model(learner).parameters())
    log.info("training %s (%.2fM parameters, loss %s) on %d images of %d identities; %d process(es) x batch %d x "
             "accumulation %d; %d steps/epoch, %d steps in all; device %s, precision %s",
             m.backbone, n_params / 1e6, cfg.loss.loss, len(train_ds), len(set(train_ds.labels.tolist())),
             accelerator.num_processes, cfg.batch_size, cfg.grad_accum_steps, steps_per_epoch, total_steps,
             accelerator.device, cfg.mixed_precision)

    def validate() -> Optional[dict]:
        """Embed the val split on all ranks, score on the main one, export best/ when it improves."""
        from .embed import embed_dataset
        from .metrics import evaluate_embeddings

        network.eval()
        if hasattr(optimizer, "eval"):
            optimizer.eval()  # schedule-free optimizers evaluate at their averaged weights
        t0 = time.time()
        with accelerator.autocast():
            emb, labels = embed_dataset(evaluated, val_ds, batch_size=cfg.val_batch_size, num_workers=cfg.num_workers,
                                        accelerator=accelerator, progress=False)
        network.train()
        if hasattr(optimizer, "train"):
            optimizer.train()
        payload = [None]
        if main_proc:
            metrics = evaluate_embeddings(emb, labels, paths=val_ds.paths)
            value = _metric_value(metrics, cfg.best_metric)
            if value is None:
                log.warning("validation metric %s undefined (too few pairs); selecting by auc", cfg.best_metric)
                value = _metric_value(metrics, "auc")
            improved = state.best_value is None or value > state.best_value
            if improved:
                state.best_value, state.best_step = value, state.step
                export_model(evaluated, m, run / "best", extra={"step": state.step, "epoch": state.epoch,
                                                                 "selected_by": cfg.best_metric, "value": value,
                                                                 "metrics": metrics})
            v, i = metrics["verification"], metrics["identification"]
            logger.log({"epoch": state.epoch, "val/auc": v["auc"], "val/eer": v["eer"],
                        "val/tar_at_far_1e-03": v["tar_at_far"]["1e-03"], "val/rank1": i["rank1"],
                        "val/map_at_r": i["map_at_r"], f"val/best_{cfg.best_metric}": state.best_value,
                        "val/seconds": time.time() - t0}, step=state.step)
            try:
                import matplotlib.pyplot as plt

                from .plots import roc_figure

                fig = roc_figure(metrics)
                logger.log_figure("val/roc", fig, state.step)
                plt.close(fig)
            except Exception as err:  # a plotting problem must never stop training
                log.warning("could not log the ROC figure: %s", err)
            log.info("validation at step %d: AUC %.4f, EER %.4f, TAR@FAR=1e-3 %s, rank-1 %.4f (%.1fs)%s",
                     state.step, v["auc"], v["eer"], v["tar_at_far"]["1e-03"], i["rank1"], time.time() - t0,
                     " -> new best, exported to best/" if improved else "")
            payload = [{"value": value, "best_value": state.best_value, "best_step": state.best_step}]
        broadcast_object_list(payload, from_process=0)
        state.best_value, state.best_step = payload[0]["best_value"], payload[0]["best_step"]
        if scheduler_unit == "validation":
            scheduler.step(payload[0]["value"])
        return payload[0]

    def save_checkpoint() -> Path:
        """accelerator.save_state into a temporary directory, renamed when complete; keep the newest K."""
        ckdir = run / "checkpoints"
        final, tmp = ckdir / f"step-{state.step}", ckdir / f".tmp-step-{state.step}"
        if main_proc:
            ckdir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main_proc:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in _checkpoints(run)[:-max(1, cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("saved checkpoint %s", final)
        accelerator.wait_for_everyone()
        return final

    # --- the loop
    from tqdm.auto import tqdm

    params = [p for p in learner.parameters() if p.requires_grad]
    consecutive_bad, last_val_step, last_ckpt_step = 0, -1, -1
    images_per_step = cfg.batch_size * cfg.grad_accum_steps
    done = state.step >= total_steps
    window = {"t0": time.time(), "wait": 0.0, "steps": 0, "loss": 0.0}
    while not done and state.epoch < cfg.epochs:
        sampler.set_epoch(state.epoch, start_step=state.batches_in_epoch)
        bar = tqdm(total=sampler.steps_per_epoch() // cfg.grad_accum_steps, initial=state.batches_in_epoch //
                   cfg.grad_accum_steps, desc=f"epoch {state.epoch}", disable=not main_proc, dynamic_ncols=True)
        bad_in_window = False
        t_wait = time.time()
        for images, labels in loader:
            window["wait"] += time.time() - t_wait
            images = images.to(accelerator.device, non_blocking=True)
            labels = labels.to(accelerator.device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(learner):
                with accelerator.autocast():
                    loss, loss_value = learner(images, labels)
                accelerator.backward(loss)
                state.batches_in_epoch += 1
                # One tiny all-reduce so that every rank skips the same steps (DDP requires it).
                bad_in_window |= bool(accelerator.reduce(torch.tensor(
                    float(not torch.isfinite(loss_value)), device=accelerator.device), "sum").item() > 0)
                window["loss"] += float(loss_value) / cfg.grad_accum_steps if torch.isfinite(loss_value) else 0.0
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.clip_grad if cfg.optim.clip_grad > 0
                                                            else float("inf"))
                    if bad_in_window or not torch.isfinite(grad_norm):
                        optimizer.zero_grad(set_to_none=True)
                        state.skipped_steps += 1
                        consecutive_bad += 1
                        log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)",
                                    state.step, consecutive_bad)
                        if consecutive_bad >= cfg.max_nonfinite_steps:
                            raise TrainingDiverged(
                                f"{consecutive_bad} consecutive steps with a non-finite loss or gradient: training "
                                f"diverged; lower --lr, set --clip-grad, or use --mixed-precision no/bf16 "
                                f"(last checkpoint: {(_checkpoints(run) or ['none'])[-1]})")
                    else:
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        consecutive_bad = 0
                        if ema is not None:
                            ema.update(network, step=state.step + 1)
                        if scheduler_unit == "step":
                            scheduler.step()
                    bad_in_window = False
            if not accelerator.sync_gradients:
                t_wait = time.time()
                continue
            state.step += 1
            window["steps"] += 1
            bar.update(1)
            if state.step % cfg.log_every_steps == 0 or state.step == total_steps:
                elapsed = time.time() - window["t0"]
                rate = window["steps"] * images_per_step / max(elapsed, 1e-9)
                stats = {"epoch": state.epoch, "loss": window["loss"] / window["steps"],
                         "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                         "images_per_s": rate * accelerator.num_processes, "images_per_s_per_process": rate,
                         "data_wait_fraction": window["wait"] / max(elapsed, 1e-9),
                         "skipped_steps": state.skipped_steps}
                if main_proc:
                    logger.log(stats, step=state.step)
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", img_s=f"{stats['images_per_s']:.0f}")
                window = {"t0": time.time(), "wait": 0.0, "steps": 0, "loss": 0.0}
            done = state.step >= total_steps
            if val_ds is not None and cfg.val_every_steps and state.step % cfg.val_every_steps == 0 and not done:
                validate()
                last_val_step = state.step
            if cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0 and not done:
                save_checkpoint()
                last_ckpt_step = state.step
            if done:
                break
            t_wait = time.time()
        bar.close()
        if state.batches_in_epoch >= sampler.steps_per_epoch() - sampler.steps_per_epoch() % cfg.grad_accum_steps:
            # The epoch is complete (a partial accumulation window at its end is dropped).
            state.epoch += 1
            state.batches_in_epoch = 0
            if scheduler_unit == "epoch":
                scheduler.step()
            done = done or state.epoch >= cfg.epochs
            if val_ds is not None and last_val_step != state.step:
                validate()
                last_val_step = state.step
            if last_ckpt_step != state.step:
                save_checkpoint()
                last_ckpt_step = state.step

    # --- the end: always a validation (so best/ exists) and a checkpoint at the final step
    if val_ds is not None and last_val_step != state.step:
        validate()
    if main_proc:
        # final/ is the model the schedule ends on, chosen by nobody: the one to report when the val people are
        # also the test people (best/ is selected on them, so its numbers there are optimistic).
        export_model(evaluated, m, run / "final", extra={"step": state.step, "epoch": state.epoch})
        if val_ds is None:
            export_model(evaluated, m, run / "best",
                         extra={"step": state.step, "selected_by": "last (no validation split)"})
    if last_ckpt_step != state.step:
        save_checkpoint()
    summary = {"steps": state.step, "epochs_completed": state.epoch, "skipped_steps": state.skipped_steps,
               "best_metric": cfg.best_metric, "best_value": state.best_value, "best_step": state.best_step,
               "best_dir": str(run / "best"), "final_dir": str(run / "final"), "run_dir": str(run)}
    if main_proc:
        (run / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        log.info("done: %d steps; best %s = %s at step %s; model in %s", state.step, cfg.best_metric,
                 state.best_value, state.best_step, run / "best")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers and (in accelerate>=1.x) the process group: call it last
    return summary


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train", description="Train a face-embedding model on WebDataset shards (single process, or under "
        "accelerate launch for DDP). Flags override the --config YAML; run with --help for all of them.")
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Command-line entry point (launch/train.py, ``facesiam train``)."""
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        raise SystemExit(f"train: {err}") from None
    return train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
