"""Optimizers and learning-rate schedules by name (``OPTIMIZERS``, ``SCHEDULERS``; facesiam/registry.py).

A schedule is a ``Schedule``: it knows when it steps, so the loop calls all three hooks (after an optimizer step,
after an epoch, after a validation) and each is a no-op unless it is that schedule's unit. An optimizer entry that
averages its own weights (schedule-free) says so in its info; ``evaluation_weights`` swaps them in for validation.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

from .errors import InputError
from .registry import Registry

if TYPE_CHECKING:  # config imports this module (to validate names against the registries)
    from .config import OptimConfig, TrainConfig

OPTIMIZERS = Registry("optimizer")
"""name -> build(param_groups, cfg: OptimConfig) -> torch optimizer. Info: ``schedule_free`` (no lr schedule is
built), ``evaluates_averaged_weights`` (validate inside ``evaluation_weights``)."""
SCHEDULERS = Registry("scheduler")
"""name -> build(cfg: OptimConfig, optimizer, total_steps) -> Schedule. Info: ``per_step`` (a per-step lambda
schedule with linear warm-up and the frozen-trunk ramp)."""


# ------------------------------------------------------------------------------------------------ optimizers
def parameter_groups(cfg: TrainConfig, learner: nn.Module) -> list[dict[str, Any]]:
    """Head, trunk and class centres as named groups with their lr multipliers.

    ``learner`` has ``.model`` (an EmbeddingModel: ``.head``, ``.trunk``) and ``.criterion`` (training's
    MetricLearner). The head's group comes first: it runs at the base lr, which is what the logs report as "lr".
    Each group is named so the schedule can find the trunk's without relying on this order.
    """
    o = cfg.optim

    def trainable(module: nn.Module) -> list[nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad]

    groups = [{"name": "head", "params": trainable(learner.model.head), "lr": o.lr},
              {"name": "trunk", "params": trainable(learner.model.trunk), "lr": o.lr * o.trunk_lr_mult}]
    centres = trainable(learner.criterion)
    if centres:
        groups.append({"name": "centres", "params": centres, "lr": o.lr * cfg.loss.class_lr_mult})
    return groups


def build_optimizer(cfg: TrainConfig, learner: nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer over ``parameter_groups(cfg, learner)``."""
    return OPTIMIZERS.get(cfg.optim.optimizer).build(parameter_groups(cfg, learner), cfg.optim)


@contextlib.contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer, optimizer_name: str) -> Iterator[None]:
    """Inside, the model holds the weights the optimizer evaluates at: schedule-free's average (``optimizer.eval()``);
    the training weights are back on exit. A no-op for optimizers that do not average their weights."""
    if not OPTIMIZERS.get(optimizer_name).info.get("evaluates_averaged_weights"):
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()


def _check_schedule_free(cfg: TrainConfig) -> None:
    o = cfg.optim
    if o.trunk_frozen_steps:
        raise InputError(f"optim.trunk_frozen_steps does not apply to {o.optimizer} (it has no lr schedule)")
    if o.ema_decay:
        # Schedule-free already averages; in train mode its parameters are the gradient points, not the averaged
        # weights it evaluates, so an EMA of them would average the wrong sequence.
        raise InputError(f"optim.ema_decay does not combine with {o.optimizer} (it averages its own weights): "
                         "set one of them")


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict], o: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay; optim.eps)."""
    return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, eps=o.eps)


@OPTIMIZERS.register("sgd")
def _sgd(groups: list[dict], o: OptimConfig) -> torch.optim.Optimizer:
    """SGD with momentum (optim.momentum; Nesterov's unless optim.nesterov is false) and L2 weight decay."""
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)


@OPTIMIZERS.register("schedulefree_adamw", check=_check_schedule_free, schedule_free=True,
                     evaluates_averaged_weights=True)
def _schedulefree_adamw(groups: list[dict], o: OptimConfig) -> torch.optim.Optimizer:
    """schedule-free AdamW (no lr schedule; validates its averaged weights; needs the schedulefree package)."""
    try:
        import schedulefree
    except ImportError:
        raise InputError("optimizer schedulefree_adamw needs the schedulefree package: pip install schedulefree") from None
    return schedulefree.AdamWScheduleFree(groups, lr=o.lr, weight_decay=o.weight_decay, eps=o.eps,
                                          warmup_steps=o.warmup_steps)


# ------------------------------------------------------------------------------------------------ schedules
class Schedule:
    """A learning-rate schedule that knows when it steps. This base class never steps: no schedule at all (what a
    schedule-free optimizer gets). Its state is the torch scheduler's, so checkpoints hold exactly that."""

    def __init__(self, scheduler: Optional[Any] = None):
        self.scheduler = scheduler  # a torch LRScheduler or ReduceLROnPlateau; None: nothing to step or save

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step that was taken (not after a skipped one)."""

    def after_epoch(self) -> None:
        """Called once at the end of every epoch."""

    def after_validation(self, value: float) -> None:
        """Called after every validation with the selection metric's value (higher is better)."""

    def rescale(self, ratio: float) -> None:
        """An elastic resize made the global batch ``1 / ratio`` times what it was: a per-step schedule re-counts the
        steps it has taken in steps of the new size, so its lr goes on by samples seen (epochs stay epochs)."""

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)


class PerStepSchedule(Schedule):
    """Steps after each optimizer step."""

    def after_optimizer_step(self) -> None:
        self.scheduler.step()

    def rescale(self, ratio: float) -> None:
        s = self.scheduler  # a LambdaLR (_warmup_schedule): lr = base lr x factor(steps taken)
        s.last_epoch = round(s.last_epoch * ratio)
        for group, base, factor in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas):
            group["lr"] = base * factor(s.last_epoch)
        s._last_lr = [group["lr"] for group in s.optimizer.param_groups]


class PerEpochSchedule(Schedule):
    """Steps at each epoch's end."""

    def after_epoch(self) -> None:
        self.scheduler.step()


class OnValidationSchedule(Schedule):
    """Steps on each validation's value (ReduceLROnPlateau)."""

    def after_validation(self, value: float) -> None:
        self.scheduler.step(value)


def build_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Schedule:
    """The configured schedule over ``total_steps`` optimizer steps; none for a schedule-free optimizer."""
    if OPTIMIZERS.get(cfg.optim.optimizer).info.get("schedule_free"):
        return Schedule()
    return SCHEDULERS.get(cfg.optim.scheduler).build(cfg.optim, optimizer, total_steps)


def _refuse_cooldown(cfg: TrainConfig) -> None:
    if cfg.optim.cooldown_steps:
        raise InputError("optim.cooldown_steps is the decay of the constant schedule: set optim.scheduler to constant")


def _refuse_per_step_options(cfg: TrainConfig) -> None:
    if cfg.optim.trunk_frozen_steps:
        raise InputError("optim.trunk_frozen_steps needs a per-step schedule: set optim.scheduler to "
                         + " or ".join(SCHEDULERS.names(per_step=True)))
    _refuse_cooldown(cfg)


def _check_constant(cfg: TrainConfig) -> None:
    if cfg.optim.cooldown_steps < 0:
        raise InputError("optim.cooldown_steps must be >= 0")


@SCHEDULERS.register("cosine_epoch", check=_refuse_per_step_options)
def _cosine_epoch(o: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Schedule:
    """CosineAnnealingLR stepped once per epoch (half-period optim.t_max epochs), the seed article's."""
    return PerEpochSchedule(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=o.t_max, eta_min=o.eta_min))


@SCHEDULERS.register("cosine", check=_refuse_cooldown, per_step=True)
def _cosine(o: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Schedule:
    """per step, linear warm-up (optim.warmup_steps) then cosine decay to optim.eta_min over the run."""
    warm, floor = max(0, o.warmup_steps), _floor(o)

    def decay(step: int) -> float:
        progress = min(1.0, max(0, step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return _warmup_schedule(o, optimizer, decay)


@SCHEDULERS.register("step", check=_refuse_per_step_options)
def _step(o: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Schedule:
    """StepLR, x optim.gamma every optim.step_size epochs."""
    return PerEpochSchedule(torch.optim.lr_scheduler.StepLR(optimizer, step_size=o.step_size, gamma=o.gamma))


@SCHEDULERS.register("plateau", check=_refuse_per_step_options)
def _plateau(o: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Schedule:
    """ReduceLROnPlateau on the selection metric, x optim.gamma after optim.patience validations without gain."""
    return OnValidationSchedule(torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=o.gamma,
                                                                           patience=o.patience))


@SCHEDULERS.register("constant", check=_check_constant, per_step=True)
def _constant(o: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Schedule:
    """per step, linear warm-up then constant, with an optional linear cooldown to optim.eta_min over the last
    optim.cooldown_steps (warmup-stable-decay)."""
    floor = _floor(o)

    def decay(step: int) -> float:
        left = max(1, total_steps - step)  # steps still to run, this one included
        if not o.cooldown_steps or left > o.cooldown_steps:
            return 1.0
        return floor + (1 - floor) * (left - 1) / o.cooldown_steps

    return _warmup_schedule(o, optimizer, decay)


@SCHEDULERS.register("poly", check=_refuse_cooldown, per_step=True)
def _poly(o: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Schedule:
    """per step, linear warm-up (optim.warmup_steps) then (1 - progress)^optim.poly_power decay to 0 at the run's end:
    arcface_torch's PolyScheduler (power 2; its later PolynomialLRWarmup: 1; eta_min unused)."""
    warm = max(0, o.warmup_steps)

    def decay(step: int) -> float:
        progress = min(1.0, max(0, step - warm) / max(1, total_steps - warm))
        return (1 - progress) ** o.poly_power

    return _warmup_schedule(o, optimizer, decay)


def _floor(o: OptimConfig) -> float:
    """eta_min as a fraction of the peak lr."""
    return o.eta_min / o.lr if o.lr > 0 else 0.0


def _warmup_schedule(o: OptimConfig, optimizer: torch.optim.Optimizer,
                     decay: Callable[[int], float]) -> PerStepSchedule:
    """LambdaLR: linear warm-up over optim.warmup_steps times ``decay(step)``; the trunk's group starts its warm-up
    after optim.trunk_frozen_steps.

    A frozen trunk gets lr 0 rather than requires_grad=False: DDP's set of parameters with gradients must not change
    mid-run, and AdamW with lr 0 leaves the weights exactly as they are (its decay is lr * weight_decay).
    """
    warm = max(0, o.warmup_steps)

    def factor(step: int, start: int = 0) -> float:
        if step < start:
            return 0.0
        ramp = min(1.0, (step - start + 1) / warm) if warm else 1.0
        return ramp * decay(step)

    def trunk_factor(step: int) -> float:
        return factor(step, o.trunk_frozen_steps)

    factors = [trunk_factor if g.get("name") == "trunk" else factor for g in optimizer.param_groups]
    return PerStepSchedule(torch.optim.lr_scheduler.LambdaLR(optimizer, factors))
