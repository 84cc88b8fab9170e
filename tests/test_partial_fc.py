"""Partial FC (facesiam/partial_fc.py): the sharded margin loss equals PML's full margin loss -- one process, and two
gloo processes over several AdamW steps -- keeps every positive when it samples, and re-shards its checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from facesiam.config import LossConfig
from facesiam.losses import Criterion
from facesiam.partial_fc import PartialFC, exclude_from_ddp, reshard, shard_size

from .conftest import run_distributed

DIM, CLASSES, BATCH, STEPS = 8, 7, 12, 3  # 7 classes on 2 ranks: the second rank's shard is padded


def _cfg(loss: str, rate: float = 0.0) -> LossConfig:
    return LossConfig(loss=loss, margin=None, scale=16.0, subcenters=2, partial_fc=rate)


def _problem(steps: int = STEPS):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(BATCH, 12, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g))
            for _ in range(steps)]


def _full(loss: str):
    """The reference: the trunk and PML's margin loss with every centre, in one process."""
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"net": torch.nn.Linear(12, DIM), "crit": Criterion(_cfg(loss), DIM, CLASSES)})


def _optimizer(module):
    return torch.optim.AdamW(module.parameters(), lr=0.05, weight_decay=0.01)


def _single(loss: str):
    module = _full(loss)
    opt = _optimizer(module)
    values = []
    for x, labels in _problem():
        opt.zero_grad()
        value, _ = module["crit"](module["net"](x), labels)
        value.backward()
        opt.step()
        values.append(float(value.detach()))
    W = module["crit"].loss.W
    return values, module["net"].weight.detach().clone(), W.detach().clone(), opt.state[W]


@pytest.mark.parametrize("loss", ["arcface", "cosface", "subcenter_arcface"])
def test_one_process_at_rate_1_is_the_full_margin_loss(loss):
    full = _full(loss)
    sharded = Criterion(_cfg(loss, 1.0), DIM, CLASSES)
    with torch.no_grad():
        sharded.loss.weight.copy_(full["crit"].loss.W)
    x, labels = _problem(1)[0]
    emb = full["net"](x).detach()
    a, b = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    want, _ = full["crit"](a, labels)
    got, _ = sharded(b, labels)
    want.backward()
    got.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sharded.loss.weight.grad, full["crit"].loss.W.grad, rtol=1e-5, atol=1e-7)


class _Learner(torch.nn.ModuleDict):
    """Trunk + loss in one module handed to DDP, as the trainer's MetricLearner."""

    def forward(self, x, labels):
        return self["crit"](self["net"](x), labels)


def _rank_worker(rank: int, world: int, loss: str):
    from torch.nn.parallel import DistributedDataParallel

    reference = _full(loss)
    k = 2 if loss == "subcenter_arcface" else 1
    torch.manual_seed(0)
    module = _Learner({"net": torch.nn.Linear(12, DIM), "crit": Criterion(_cfg(loss, 1.0), DIM, CLASSES)})
    partial = module["crit"].loss
    per_rank = shard_size(CLASSES, world)
    with torch.no_grad():  # this rank's columns of the reference's centres (zeros where the shard is padding)
        mine = reference["crit"].loss.W[:, rank * per_rank * k:(rank + 1) * per_rank * k]
        partial.weight.zero_()
        partial.weight[:, :mine.shape[1]] = mine
    # facesiam's one guarded call of DDP's private ignore list: if torch changes what it does, the centres are
    # broadcast or averaged across ranks and this run no longer equals the one-process reference.
    exclude_from_ddp(module, partial.ddp_ignored("crit.loss"))
    ddp = DistributedDataParallel(module)
    opt = _optimizer(module)
    values = []
    for x, labels in _problem():
        half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        opt.zero_grad()
        value, _ = ddp(x[half], labels[half])
        value.backward()
        opt.step()
        values.append(float(value.detach()))
    return values, module["net"].weight.detach().numpy(), partial.shard_state(opt)


@pytest.mark.parametrize("loss", ["arcface", "subcenter_arcface"])
def test_two_ranks_at_rate_1_equal_the_full_loss_over_several_steps(loss):
    values, net, W, adam = _single(loss)
    results = run_distributed(_rank_worker, 2, loss)
    for got_values, got_net, _ in results:
        assert got_values == pytest.approx(values, rel=1e-5)  # every rank computes the global batch's loss
        np.testing.assert_allclose(got_net, net.numpy(), rtol=1e-4, atol=1e-6)
    shards = [state for *_, state in results]
    merged = reshard(shards, 0, 1)  # the 2-rank checkpoint resumed on 1 process
    k = 2 if loss == "subcenter_arcface" else 1
    np.testing.assert_allclose(merged["weight"].numpy(), W.numpy(), rtol=1e-4, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_allclose(merged["optimizer"][key].numpy(), adam[key].numpy(), rtol=1e-4, atol=1e-8)
    assert float(merged["optimizer"]["step"]) == STEPS
    assert merged["weight"].shape == (DIM, CLASSES * k)
    # and onto 3 ranks: each takes its columns, the last padded with zeros
    thirds = [reshard(shards, r, 3)["weight"] for r in range(3)]
    np.testing.assert_allclose(torch.cat(thirds, dim=1)[:, :CLASSES * k].numpy(), W.numpy(), rtol=1e-4, atol=1e-6)
    assert thirds[2][:, (CLASSES - 2 * shard_size(CLASSES, 3)) * k:].abs().sum() == 0


def test_sampling_keeps_every_positive_and_the_rate_of_the_rest():
    from pytorch_metric_learning import losses

    classes, rate = 100, 0.1
    module = PartialFC(losses.ArcFaceLoss(classes, DIM), classes, rate)
    module.train()
    labels = torch.tensor([3, 3, 17, 42, 99, 0, 58, 3, 17])  # 6 positives, fewer than the rate's 10
    emb = torch.randn(len(labels), DIM, requires_grad=True)
    loss = module(emb, labels)
    loss.backward()
    sampled = set(module.last_sampled.tolist())
    assert set(labels.tolist()) <= sampled and len(sampled) == math.ceil(rate * classes)
    used = module.weight.grad.abs().sum(dim=0) > 0
    assert set(torch.nonzero(used).squeeze(1).tolist()) == sampled  # no gradient reaches a centre left out
    many = torch.arange(30)  # more positives than the rate's share: all of them, no negatives
    module(torch.randn(30, DIM), many)
    assert module.last_sampled.tolist() == list(range(30))
    module.eval()
    module(emb.detach(), labels)
    assert len(module.last_sampled) == classes  # evaluation uses every centre


def test_partial_fc_config_is_checked():
    from facesiam.errors import InputError
    from facesiam.losses import check_loss_config

    with pytest.raises(InputError, match="needs a margin loss"):
        check_loss_config(LossConfig(loss="triplet", partial_fc=0.5))
    with pytest.raises(InputError, match=r"in \(0, 1\]"):
        check_loss_config(LossConfig(loss="arcface", partial_fc=1.5))
    with pytest.raises(InputError, match="holds 7 classes"):
        target = PartialFC(torch.nn.Module(), 8, 1.0)
        target.loss.W = torch.nn.Parameter(torch.zeros(DIM, 8))
        target.load_shards([{"rank": 0, "world_size": 1, "num_classes": 7, "k": 1, "weight": torch.zeros(DIM, 7),
                             "optimizer": {}}])


def test_a_torch_without_ddps_ignore_list_fails_in_one_clear_line(monkeypatch):
    from torch.nn.parallel import DistributedDataParallel

    assert callable(getattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None)), \
        "torch renamed DDP's ignore list: facesiam.partial_fc.exclude_from_ddp must follow"
    module = torch.nn.Linear(2, 2)
    exclude_from_ddp(module, ["weight"])
    assert module._ddp_params_and_buffers_to_ignore == ["weight"]  # what DDP.__init__ reads
    monkeypatch.delattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model")
    with pytest.raises(RuntimeError, match="partial_fc"):
        exclude_from_ddp(module, ["weight"])
