"""Optimizers and schedules by name (facesiam/optim.py): parameter groups, each schedule's shape and the unit it steps
at, exact state round trips, the frozen trunk, and the schedule-free optimizer's averaged weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from facesiam.config import config_from_dict
from facesiam.errors import InputError
from facesiam.losses import Criterion
from facesiam.model import build_model
from facesiam.optim import (OPTIMIZERS, SCHEDULERS, Schedule, build_optimizer, build_schedule,
                            evaluation_weights)
from facesiam.training.setup import MetricLearner


def _learner_and_optimizer(overrides: dict, num_classes: int):
    """A test_efficientnet MetricLearner (ArcFace, 16-d) and its optimizer, from config overrides."""
    cfg = config_from_dict({"model": {"backbone": "test_efficientnet", "embedding_dim": 16, **overrides.get("model", {})},
                            "loss": {"loss": "arcface", **overrides.get("loss", {})},
                            "optim": overrides.get("optim", {})})
    learner = MetricLearner(build_model(cfg.model), Criterion(cfg.loss, 16, num_classes=num_classes))
    return cfg, learner, build_optimizer(cfg, learner)


def _lrs(optimizer) -> list[float]:
    return [g["lr"] for g in optimizer.param_groups]


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_builds_over_every_parameter(name):
    try:
        cfg, learner, optimizer = _learner_and_optimizer({"optim": {"optimizer": name}}, num_classes=3)
    except InputError as err:  # an optional package that is not installed: the error says how to get it
        assert "pip install" in str(err)
        pytest.skip(str(err))
    assert isinstance(optimizer, torch.optim.Optimizer)
    grouped = sorted(id(p) for g in optimizer.param_groups for p in g["params"])
    assert grouped == sorted(id(p) for p in learner.parameters())


def test_optimizer_groups_cover_every_parameter_once_with_their_lr_multipliers():
    cfg, learner, optimizer = _learner_and_optimizer({"model": {"head": "face"}, "loss": {"class_lr_mult": 10.0},
                                                      "optim": {"lr": 1e-3, "trunk_lr_mult": 0.1}}, num_classes=5)
    model = learner.model
    groups = optimizer.param_groups
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in learner.parameters()), "each trainable tensor in one group"
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert all(lr_of[id(p)] == pytest.approx(1e-4) for p in model.trunk.parameters())
    assert all(lr_of[id(p)] == pytest.approx(1e-3) for p in model.head.parameters())
    assert all(lr_of[id(p)] == pytest.approx(1e-2) for p in learner.criterion.parameters())
    assert groups[0]["lr"] == pytest.approx(1e-3), "the logged lr (group 0) is the base lr"


# When each schedule changes the lr; a new scheduler must say here when it steps.
UNIT = {"cosine_epoch": "epoch", "step": "epoch", "cosine": "optimizer_step", "constant": "optimizer_step",
        "poly": "optimizer_step", "plateau": "validation"}
SETTINGS = {"step_size": 1, "t_max": 4, "warmup_steps": 3, "patience": 1, "gamma": 0.5}


def test_every_scheduler_says_when_it_steps():
    assert set(UNIT) == set(SCHEDULERS.names())


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_each_schedule_steps_at_its_unit_only(name):
    cfg, _, optimizer = _learner_and_optimizer({"optim": {"scheduler": name, "lr": 1e-3, **SETTINGS}}, num_classes=3)
    schedule = build_schedule(cfg, optimizer, total_steps=20)
    values = iter([0.9] + [0.5] * SETTINGS["patience"] * 2)  # for plateau: the best first, then worse ones
    hooks = {"optimizer_step": schedule.after_optimizer_step, "epoch": schedule.after_epoch,
             "validation": lambda: schedule.after_validation(next(values))}
    for unit, hook in hooks.items():
        before = _lrs(optimizer)
        for _ in range(SETTINGS["patience"] + 2):
            optimizer.step()  # (no gradients: a no-op, but keeps torch's order-of-calls check quiet)
            hook()
        changed = _lrs(optimizer) != before
        assert changed == (unit == UNIT[name]), f"{name}: lr {'changed' if changed else 'kept'} after {unit}"


def test_plateau_decays_only_after_patience_validations_without_improvement():
    cfg, _, optimizer = _learner_and_optimizer({"optim": {"scheduler": "plateau", "lr": 1e-3, "patience": 2,
                                                          "gamma": 0.1}}, num_classes=3)
    schedule = build_schedule(cfg, optimizer, total_steps=20)
    lrs = []
    for value in (0.5, 0.6, 0.6, 0.55, 0.59, 0.7):
        schedule.after_validation(value)
        lrs.append(optimizer.param_groups[0]["lr"])
    # 0.6 is the best after the second; the third, fourth and fifth do not beat it: the third bad one decays
    np.testing.assert_allclose(lrs, [1e-3, 1e-3, 1e-3, 1e-3, 1e-4, 1e-4], rtol=1e-9)


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_schedule_state_is_the_torch_schedulers_and_resumes_exactly(name):
    overrides = {"optim": {"scheduler": name, "lr": 1e-3, **SETTINGS}}
    cfg, _, optimizer = _learner_and_optimizer(overrides, num_classes=3)
    schedule = build_schedule(cfg, optimizer, total_steps=20)

    def advance(s: Schedule, opt, n: int) -> list[list[float]]:
        seen = []
        for i in range(n):
            opt.step()
            s.after_optimizer_step()
            s.after_epoch()
            s.after_validation(1.0 - 0.01 * i)
            seen.append(_lrs(opt))
        return seen

    advance(schedule, optimizer, 5)
    state = schedule.state_dict()
    assert state == schedule.scheduler.state_dict(), "checkpoints hold exactly the torch scheduler's state"
    _, _, optimizer2 = _learner_and_optimizer(overrides, num_classes=3)
    resumed = build_schedule(cfg, optimizer2, total_steps=20)
    optimizer2.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(state)
    assert advance(resumed, optimizer2, 6) == advance(schedule, optimizer, 6)


def test_schedule_free_gets_no_schedule_and_validates_its_averaged_weights():
    cfg = config_from_dict({"optim": {"optimizer": "schedulefree_adamw", "scheduler": "cosine"}})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    schedule = build_schedule(cfg, optimizer, total_steps=10)
    assert schedule.scheduler is None and schedule.state_dict() == {}
    schedule.after_optimizer_step(), schedule.after_epoch(), schedule.after_validation(1.0)
    assert _lrs(optimizer) == [0.1]

    class Recorder:
        def __init__(self):
            self.calls = []

        def eval(self):
            self.calls.append("eval")

        def train(self):
            self.calls.append("train")

    averaged, plain = Recorder(), Recorder()
    with pytest.raises(RuntimeError), evaluation_weights(averaged, "schedulefree_adamw"):
        assert averaged.calls == ["eval"]
        raise RuntimeError("validation failed")
    assert averaged.calls == ["eval", "train"], "the training weights come back even when validation fails"
    with evaluation_weights(plain, "adamw"):
        pass
    assert plain.calls == []


def _lr_trace(cfg, optimizer, steps: int) -> list:
    """Every parameter group's lr at each of ``steps`` optimizer steps under cfg's schedule for a run that long."""
    schedule = build_schedule(cfg, optimizer, total_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(_lrs(optimizer))
        optimizer.step()
        schedule.after_optimizer_step()
    return lrs


def test_frozen_trunk_keeps_lr_zero_then_warms_up_with_the_shared_cosine():
    cfg, _, optimizer = _learner_and_optimizer({"optim": {"lr": 1e-3, "scheduler": "cosine", "warmup_steps": 4,
                                                          "eta_min": 0.0, "trunk_frozen_steps": 10}}, num_classes=5)
    lrs = _lr_trace(cfg, optimizer, 40)
    head, trunk, centres = (np.array(c) for c in zip(*lrs))
    cosine = [1e-3 * 0.5 * (1 + math.cos(math.pi * max(0, s - 4) / 36)) for s in range(40)]
    np.testing.assert_allclose(head[4:], cosine[4:], rtol=1e-6)
    np.testing.assert_allclose(head[:4], [1e-3 * (s + 1) / 4 for s in range(4)], rtol=1e-6)
    np.testing.assert_allclose(centres, head)
    assert (trunk[:10] == 0).all()
    np.testing.assert_allclose(trunk[10:14], [cosine[s] * (s - 9) / 4 for s in range(10, 14)], rtol=1e-6)
    np.testing.assert_allclose(trunk[14:], head[14:])


def test_constant_schedule_cools_down_linearly_to_eta_min_over_its_last_steps():
    cfg, _, optimizer = _learner_and_optimizer({"optim": {"lr": 1e-3, "scheduler": "constant", "warmup_steps": 4,
                                                          "eta_min": 1e-5, "cooldown_steps": 10}}, num_classes=5)
    lrs = [group_lrs[0] for group_lrs in _lr_trace(cfg, optimizer, 30)]
    expected = ([1e-3 * (s + 1) / 4 for s in range(4)] + [1e-3] * 16
                + [1e-5 + (1e-3 - 1e-5) * (9 - k) / 10 for k in range(10)])  # 9/10 of the way ... eta_min
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)


@pytest.mark.parametrize("power", [2.0, 1.0])
def test_poly_schedule_is_arcface_torchs_warmup_then_squared_decay_to_zero(power):
    cfg, _, optimizer = _learner_and_optimizer({"optim": {"lr": 0.1, "scheduler": "poly", "warmup_steps": 4,
                                                          "eta_min": 1e-3, "poly_power": power}}, num_classes=5)
    lrs = _lr_trace(cfg, optimizer, 40)
    # arcface_torch's PolyScheduler: base_lr * (1 - (step - warmup) / (total - warmup)) ** 2 after a linear warm-up
    # (facesiam's warm-up counts the step being taken, so the first step already moves); eta_min plays no part.
    expected = [0.1 * (s + 1) / 4 for s in range(4)] + [0.1 * (1 - (s - 4) / 36) ** power for s in range(4, 40)]
    np.testing.assert_allclose([lr[0] for lr in lrs], expected, rtol=1e-9)
    np.testing.assert_allclose([lr[1] for lr in lrs], expected, rtol=1e-9)  # the trunk's group alike
    assert lrs[-1][0] == pytest.approx(0.1 / 36 ** power), "the last step is one step short of 0"


def test_a_resize_rescales_a_per_step_schedule_by_samples_seen():
    """2 -> 1 processes after 10 steps (the global batch halves): the cosine goes on from step 20 of the 1-process
    run's 80, where the same number of samples puts it; the reference is its formula."""
    cfg, _, optimizer = _learner_and_optimizer({"optim": {"lr": 1e-3, "scheduler": "cosine", "warmup_steps": 0,
                                                          "eta_min": 0.0}}, num_classes=5)
    schedule = build_schedule(cfg, optimizer, total_steps=80)  # the 1-process length of the run
    for _ in range(10):
        optimizer.step()
        schedule.after_optimizer_step()
    schedule.rescale(2.0)
    lrs = []
    for _ in range(60):
        lrs.append(_lrs(optimizer)[0])
        optimizer.step()
        schedule.after_optimizer_step()
    np.testing.assert_allclose(lrs, [1e-3 * 0.5 * (1 + math.cos(math.pi * s / 80)) for s in range(20, 80)], rtol=1e-6)
    Schedule().rescale(0.5)  # nothing to re-count without a per-step schedule


def test_frozen_trunk_weights_do_not_move_until_unfrozen():
    torch.manual_seed(0)
    cfg, learner, optimizer = _learner_and_optimizer(
        {"model": {"image_size": 32}, "optim": {"lr": 1e-2, "weight_decay": 0.1, "scheduler": "cosine",
                                                "trunk_frozen_steps": 3}}, num_classes=4)
    schedule = build_schedule(cfg, optimizer, total_steps=10)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 4

    def snapshot(module):
        return {k: v.detach().clone() for k, v in module.named_parameters()}

    start_trunk, start_head = snapshot(learner.model.trunk), snapshot(learner.model.head)
    for step in range(4):
        if step == 3:  # the last frozen step has run: nothing in the trunk moved, everything in the head did
            assert all(torch.equal(v, start_trunk[k]) for k, v in snapshot(learner.model.trunk).items())
            assert all(not torch.equal(v, start_head[k]) for k, v in snapshot(learner.model.head).items())
        loss, _ = learner(images, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.after_optimizer_step()
    assert any(not torch.equal(v, start_trunk[k]) for k, v in snapshot(learner.model.trunk).items())


@pytest.mark.parametrize("optim,match", [
    ({"scheduler": "cosine", "cooldown_steps": 5}, "cooldown_steps is the decay of the constant schedule"),
    ({"scheduler": "constant", "cooldown_steps": -1}, "cooldown_steps must be >= 0"),
    ({"scheduler": "cosine_epoch", "trunk_frozen_steps": 5}, "trunk_frozen_steps needs a per-step schedule: set "
                                                             "optim.scheduler to cosine or constant"),
    ({"optimizer": "schedulefree_adamw", "scheduler": "cosine", "trunk_frozen_steps": 5}, "has no lr schedule"),
    ({"optimizer": "schedulefree_adamw", "ema_decay": 0.99}, "ema_decay does not combine with schedulefree"),
])
def test_each_entry_checks_the_fields_it_uses(optim, match):
    with pytest.raises(InputError, match=match):
        config_from_dict({"optim": optim})


def test_valid_combinations_pass():
    config_from_dict({"optim": {"optimizer": "adamw", "ema_decay": 0.99}})  # the plain optimizer keeps the EMA
    config_from_dict({"optim": {"scheduler": "constant", "cooldown_steps": 5, "trunk_frozen_steps": 3}})


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_momentum_is_nesterovs_unless_asked_otherwise(nesterov):
    _, _, optimizer = _learner_and_optimizer({"optim": {"optimizer": "sgd", "lr": 0.1, "nesterov": nesterov}},
                                             num_classes=3)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"] is nesterov
