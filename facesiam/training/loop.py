"""The training loop: Accelerate (DDP, mixed precision), per-class sampling, accumulation, exact resume, validation.

    accelerate launch --config_file accelerate_configs/cpu.yaml launch/train.py --data SHARDS --output RUN
    python launch/train.py --data SHARDS --output RUN --config launch/configs/seed.yaml --max-steps 100

``Trainer.train`` reads top to bottom: for each accumulation window of the epoch, one ``train_step`` (forward ->
loss in fp32 -> backward -> clip -> step, or a skip when anything was non-finite), then the cadence decides whether
to validate (training/validation.py) and checkpoint (training/checkpoint.py); a SIGTERM/SIGUSR1 stops every rank
after the same step, checkpointed, with exit status 143 (training/preemption.py). Everything is built by
training/setup.py; what is logged lives in training/tracking.py. Everything needed to resume is explicit: the
model, optimizer, schedule (and scaler, EMA) states that Accelerate saves, plus ``TrainState``. A resume keeps the
run's settings (training/run_config.py): RUN/config.yaml is written once, allowed changes go to its history.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import numpy as np
import torch

from ..config import TrainConfig
from ..distill import teacher_cosine
from ..errors import FacesiamError
from ..optim import build_optimizer, build_schedule, evaluation_weights
from . import peers, setup
from .cadence import Cadence
from .checkpoint import Checkpointer, TrainState, find_checkpoint, read_train_state, resume_state
from .preemption import PREEMPTED_EXIT_CODE, Preempted, Preemption, shield_loader_workers
from .run_config import record_start
from .tracking import RunLogger, StepWindow
from .validation import build_validator

log = logging.getLogger("facesiam.train")


class TrainingDiverged(FacesiamError, RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class Trainer:
    """One training run: ``Trainer(cfg).train()`` -> summary (steps, best metric, paths)."""

    def __init__(self, cfg: TrainConfig):
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.accelerator = acc = setup.build_accelerator(cfg)
        self.main = acc.is_main_process
        peers.record(acc)  # every rank's address, while the network works: a failed collective names the peer
        logging.basicConfig(level=logging.INFO if self.main else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file save messages drown the run's log
        self.run = Path(cfg.output)
        if self.main:
            self.run.mkdir(parents=True, exist_ok=True)
        # Before anything is built: a resume that would change the run is refused here, in one line, on every rank.
        resume_from = find_checkpoint(self.run, cfg.resume)
        record_start(cfg, self.run, resume_from, write=self.main)
        acc.wait_for_everyone()
        set_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)

        self.data = setup.build_data(cfg, acc)
        shield_loader_workers(self.data.loader)  # a SIGTERM to the process group must not kill them mid-step
        self.distillation = setup.build_distillation(cfg, acc, self.data)  # None unless distill.teacher is set
        learner = setup.build_learner(cfg, num_classes=len(self.data.train.classes), distillation=self.distillation,
                                      device=acc.device)
        optimizer = build_optimizer(cfg, learner)
        self.state = TrainState(world_size=acc.num_processes, batch_size=cfg.batch_size)
        self.steps_per_epoch = steps_per_epoch = self.data.steps_per_epoch  # epoch 0's: the run's length counts them
        resize = 1.0
        if resume_from is not None:  # on another world size: the epoch's rest re-dealt (an elastic resize)
            self.state = read_train_state(resume_from)
            resize = resume_state(self.state, acc.num_processes, cfg.batch_size, self.data.steps_left,
                                  steps_per_epoch, cfg.epochs)
        self.total_steps = setup.total_steps(cfg, steps_per_epoch, self.state.steps_offset)
        # The schedule is not prepared: AcceleratedScheduler would step it once per process. It knows its own unit:
        # the loop calls all its hooks (optim.Schedule). Its length is this world size's, without the resize's offset:
        # after a resize it re-counts its steps in this size's (rescale below), so the lr goes on by samples seen.
        self.schedule = build_schedule(cfg, optimizer, setup.total_steps(cfg, steps_per_epoch))
        self.learner, self.optimizer = acc.prepare(learner, optimizer)
        if self.schedule.scheduler is not None:  # none for schedule-free: nothing to save, the layout stays as it was
            acc.register_for_checkpointing(self.schedule)
        self.network = acc.unwrap_model(self.learner).model  # the embedding network being trained
        self.ema = None
        if cfg.optim.ema_decay:
            from timm.utils import ModelEmaV3

            # Every rank keeps the same average (DDP keeps the weights equal), so nothing is communicated; it is
            # part of the checkpoint, so a resumed run continues the same average.
            self.ema = ModelEmaV3(self.network, decay=cfg.optim.ema_decay, use_warmup=True)
            acc.register_for_checkpointing(self.ema)
        self.evaluated = self.ema.module if self.ema is not None else self.network  # what best/ and final/ hold

        self.checkpointer = Checkpointer(acc, self.run, cfg.keep_checkpoints, self.state,
                                         alignment=self.data.alignment,
                                         centres=getattr(learner.criterion, "partial", None), optimizer=self.optimizer)
        if resume_from is not None:
            self.checkpointer.restore(resume_from)
            if resize != 1.0:
                self.schedule.rescale(resize)
        elif cfg.loss.init_centres == "imprint":
            setup.imprint_centres(acc, acc.unwrap_model(self.learner), self.data)
        self.logger = RunLogger(acc, cfg, self.run, resumed_step=self.state.step if resume_from else None)
        self.validator = build_validator(acc, cfg, self.data.val, self.checkpointer, self.logger,
                                         probe=self._teacher_probe())  # None: no val split and no val_bin
        self.cadence = Cadence(cfg.val_every_steps, cfg.checkpoint_every_steps, validation=self.validator is not None)
        if resume_from is not None:
            self.cadence.resumed_at(self.state.step)
        self.params = [p for p in self.learner.parameters() if p.requires_grad]
        self.window = StepWindow(acc.device)
        self.consecutive_bad = 0
        self.final_exported = False
        self.preemption = Preemption()

    def _teacher_probe(self) -> Optional[Callable[[np.ndarray], dict[str, Any]]]:
        """In a distillation run, what validation adds: the mean student-teacher cosine on the held-out photos."""
        if self.distillation is None or self.distillation.val is None:
            return None
        criterion = self.accelerator.unwrap_model(self.learner).criterion
        targets, found = self.distillation.val

        def probe(embeddings: np.ndarray) -> dict[str, Any]:
            return {"teacher": self.distillation.teacher, "teacher_cosine": teacher_cosine(criterion, embeddings,
                                                                                          targets, found),
                    "photos_with_target": int(found.sum())}

        return probe

    # ------------------------------------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Run to total_steps (or the last epoch), validating and checkpointing on the cadence; returns a summary."""
        from tqdm.auto import tqdm

        s, cfg = self.state, self.cfg
        self._log_plan()
        with self.preemption:  # from here SIGTERM/SIGUSR1 stop the run after a step (training/preemption.py)
            while s.step < self.total_steps and s.epoch < cfg.epochs:
                steps = self.data.steps_left(s.epoch, s.earlier_stretches)  # this world size's stretch of the epoch
                if s.batches_in_epoch >= self.data.batches_per_epoch:  # a resize left less than a step of it
                    s.epoch, s.batches_in_epoch, s.earlier_stretches = s.epoch + 1, 0, []
                    self.schedule.after_epoch()
                    continue
                bar = tqdm(total=steps, initial=s.batches_in_epoch // cfg.grad_accum_steps, desc=f"epoch {s.epoch}",
                           disable=not self.main, dynamic_ncols=True)
                windows = self.data.windows(s.epoch, s.batches_in_epoch, s.earlier_stretches)
                for window in self.window.timed(windows):
                    grad_norm = self.train_step(window)
                    s.batches_in_epoch += len(window)
                    bar.update(1)
                    if s.step % cfg.log_every_steps == 0 or s.step == self.total_steps:
                        self._log_step(grad_norm, bar)
                    epoch_end = s.batches_in_epoch >= self.data.batches_per_epoch
                    if epoch_end:
                        s.epoch, s.batches_in_epoch, s.earlier_stretches = s.epoch + 1, 0, []
                        self.schedule.after_epoch()
                    last = s.step >= self.total_steps or s.epoch >= cfg.epochs
                    self.after_step(boundary=epoch_end or last, last=last)
                    if last:
                        break
                    if self.preemption.should_stop(self.accelerator):  # any rank got SIGTERM/SIGUSR1
                        bar.close()
                        self._stop_preempted()
                bar.close()
        self.after_step(boundary=True, last=True)  # a run resumed at its end still exports and checkpoints
        return self._finish()

    def train_step(self, window: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over the window's micro-batches; returns the gradient norm (a device tensor)."""
        acc, cfg, s = self.accelerator, self.cfg, self.state
        nonfinite = torch.zeros((), dtype=torch.bool, device=acc.device)  # kept on the device: no sync per batch
        for i, (images, labels) in enumerate(window):
            images = self.data.model_input(images)  # moved, [augmented,] normalised, [channels-last]
            labels = labels.to(acc.device, non_blocking=True)
            # DDP all-reduces the gradients once per window: on its last micro-batch.
            sync = acc.no_sync(self.learner) if i < len(window) - 1 else contextlib.nullcontext()
            with sync:
                with acc.autocast():
                    loss, value = self.learner(images, labels)
                acc.backward(loss / len(window))
            finite = torch.isfinite(value)
            nonfinite |= ~finite
            self.window.loss += torch.where(finite, value.detach(), 0.0) / len(window)
        grad_norm = acc.clip_grad_norm_(self.params, cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else float("inf"))
        # The one host sync of a step: every rank must take the same decision (DDP), so a non-finite loss on any
        # rank, or a non-finite gradient norm, skips the step everywhere.
        flag = (nonfinite | ~torch.isfinite(grad_norm)).float()
        if acc.reduce(flag, "sum").item() > 0:
            self._skip_step()
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.consecutive_bad = 0
            if self.ema is not None:
                self.ema.update(self.network, step=s.step + 1)
            self.schedule.after_optimizer_step()
        s.step += 1
        self.window.steps += 1
        return grad_norm

    def after_step(self, *, boundary: bool, last: bool) -> None:
        """Validate and checkpoint when the cadence says so; at the last step also export final/."""
        validate, checkpoint = self.cadence.due(self.state.step, boundary=boundary)
        if validate:
            self._validate()
        if last and not self.final_exported:
            self._export_final()
        if checkpoint:
            self.checkpointer.save(self.state.step)

    def _stop_preempted(self) -> NoReturn:
        """Every rank agreed to stop after this step: checkpoint it (unless the cadence just did) and exit 143."""
        s = self.state
        just_saved = self.cadence.last_checkpointed == s.step
        saved = self.checkpointer.latest() if just_saved else self.checkpointer.save(s.step)
        if self.main:
            log.warning("preempted: stopped after step %d of %d, checkpoint %s; exit status %d (relaunch with "
                        "--resume latest)", s.step, self.total_steps, saved, PREEMPTED_EXIT_CODE)
        self.accelerator.end_training()  # flushes the trackers, closes the process group
        raise Preempted(s.step)

    # ------------------------------------------------------------------------------------------------ helpers
    def _skip_step(self) -> None:
        s = self.state
        self.optimizer.zero_grad(set_to_none=True)
        s.skipped_steps += 1
        self.consecutive_bad += 1
        log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", s.step, self.consecutive_bad)
        if self.consecutive_bad >= self.cfg.max_nonfinite_steps:
            raise TrainingDiverged(
                f"{self.consecutive_bad} consecutive steps with a non-finite loss or gradient: training diverged; "
                f"lower --lr, set --clip-grad, or use --mixed-precision no/bf16 "
                f"(last checkpoint: {self.checkpointer.latest() or 'none'})")

    def _validate(self) -> None:
        with evaluation_weights(self.optimizer, self.cfg.optim.optimizer):  # schedule-free: its averaged weights
            result = self.validator.run(self.evaluated, self.state)
        self.schedule.after_validation(result["value"])

    def _export_final(self) -> None:
        s = self.state
        if self.main:
            # final/ is the model the schedule ends on, chosen by nobody: the one to report when the val people
            # are also the test people (best/ is selected on them, so its numbers there are optimistic).
            self.checkpointer.export(self.evaluated, self.cfg.model, "final", {"step": s.step, "epoch": s.epoch})
            if self.validator is None:
                self.checkpointer.export(self.evaluated, self.cfg.model, "best",
                                         {"step": s.step, "selected_by": "last (no validation split)"})
        self.final_exported = True

    def _log_step(self, grad_norm: torch.Tensor, bar) -> None:
        """The log step: the only place device values (loss, gradient norm) are read on the host."""
        cfg, acc = self.cfg, self.accelerator
        stats = {"epoch": self.state.epoch,
                 **self.window.stats(cfg.batch_size * cfg.grad_accum_steps, acc.num_processes),
                 "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                 "skipped_steps": self.state.skipped_steps}
        self.logger.log(stats, step=self.state.step)
        warning = self.window.slow_data_warning(stats, cfg.num_workers)
        if warning and acc.is_main_process:
            log.warning(warning)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", img_s=f"{stats['images_per_s']:.0f}")
        self.window.reset()

    def _log_plan(self) -> None:
        cfg, acc, data = self.cfg, self.accelerator, self.data
        n_params = sum(p.numel() for p in acc.unwrap_model(self.learner).parameters())
        loss = f"distillation from {self.distillation.teacher}" if self.distillation else cfg.loss.loss
        log.info("training %s (%.2fM parameters, loss %s) on %d images of %d identities; %d process(es) x batch %d "
                 "x accumulation %d; %d steps/epoch, %d steps in all; device %s, precision %s", cfg.model.backbone,
                 n_params / 1e6, loss, len(data.train), len(set(data.train.labels.tolist())),
                 acc.num_processes, cfg.batch_size, cfg.grad_accum_steps, self.steps_per_epoch, self.total_steps,
                 acc.device, cfg.mixed_precision)

    def _finish(self) -> dict[str, Any]:
        s, run = self.state, self.run
        summary = {"steps": s.step, "epochs_completed": s.epoch, "skipped_steps": s.skipped_steps,
                   "best_metric": self.cfg.best_metric, "best_value": s.best_value, "best_step": s.best_step,
                   "best_dir": str(run / "best"), "final_dir": str(run / "final"), "run_dir": str(run)}
        self.logger.summary(summary, run)
        best = "n/a" if s.best_value is None else f"{s.best_value:.4g}"  # for people: 0.00112, not 0.0011201344...
        log.info("done: %d steps; best %s = %s at step %s; model in %s", s.step, self.cfg.best_metric,
                 best, s.best_step, run / "best")
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()  # closes the trackers and (in accelerate>=1.x) the process group: call it last
        return summary


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training as configured; returns a summary (steps, best metric, paths)."""
    if not cfg.data or not cfg.output:
        from ..errors import InputError

        raise InputError("--data SHARDS and --output RUN are required")
    with peers.named_on_failure(cfg.collective_timeout):  # a node gone from the network: one line naming it
        trainer = Trainer(cfg)
        try:
            return trainer.train()
        finally:
            trainer.data.close()  # persistent, SIGTERM-shielded workers would keep the process from exiting
