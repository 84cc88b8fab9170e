"""Partial FC: a margin loss whose class centres are sharded across ranks, with sampled negatives.

An, Zhu, Xiao, et al., "Partial FC: Training 10 Million Identities on a Single Machine" (ICCVW 2021) and "Killing
Two Birds with One Stone: Efficient and Robust Training of Face Recognition CNNs by Partial FC" (CVPR 2022); as in
insightface's arcface_torch. With C identities on W ranks, each rank holds S = ceil(C / W) centres (and their
optimizer state) instead of all C, and never materialises the logits of all classes:

1. every rank gathers the global batch's embeddings (with gradients) and labels;
2. it keeps every centre of its shard that is a positive of the global batch plus a random ``rate`` of the others
   (rate 1.0: all of them);
3. it computes the cosine logits of the whole batch against those centres and applies the margin to the positives
   (the PML loss's own ``modify_cosine_of_target_classes`` and ``scale_logits``: ArcFace, CosFace, SubCenter);
4. the softmax cross-entropy runs across ranks: one all-reduce of the row maxima and one of the sums of
   exponentials; each rank's backward is local ((softmax - one-hot) / B on its own columns).

The gradient of the gathered embeddings comes back to each rank through the gather's backward (an all-reduce, the
rank's slice, times W: DDP then averages the trunk's gradients over W ranks, so the product is the gradient of the
global-batch loss). The centres are not DDP parameters (each rank's differ): ``ddp_ignored`` names them, and
``shard_state`` / ``load_shards`` checkpoint them per rank and re-shard them onto another world size. Under one
rank and rate 1.0 it is exactly the full margin loss.

Hand-written because pytorch-metric-learning has no sharded margin loss; the margin arithmetic is PML's.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import InputError


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_size(num_classes: int, world_size: int) -> int:
    """Centres per rank: every rank holds the same number (the last one pads), so state dicts match in shape."""
    return math.ceil(num_classes / world_size)


class _GatherWithGradient(torch.autograd.Function):
    """all_gather of equal-sized batches whose backward returns this rank's slice of the summed gradient, times the
    world size (DDP divides the trunk's gradients by it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.size, ctx.n = rank, size, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n] * ctx.size


def _gather_labels(labels: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(labels) for _ in range(world()[1])]
    dist.all_gather(parts, labels.contiguous())
    return torch.cat(parts)


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over rows whose columns are spread across ranks. ``target[i]``: the column of
    row i's class on this rank, -1 when another rank holds it. Every rank returns the same value."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        distributed = world()[1] > 1
        top = logits.max(dim=1).values if logits.shape[1] else logits.new_full((logits.shape[0],), -torch.inf)
        if distributed:
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
        exp = torch.exp(logits - top[:, None])
        total = exp.sum(dim=1)
        local = target >= 0
        positive = torch.zeros_like(top)
        positive[local] = logits[local, target[local]]
        if distributed:
            dist.all_reduce(total)
            dist.all_reduce(positive)
        ctx.save_for_backward(exp / total[:, None], target)
        return (torch.log(total) + top - positive).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        prob, target = ctx.saved_tensors
        local = target >= 0
        out = prob.clone()
        out[local, target[local]] -= 1
        return out * (grad / prob.shape[0]), None


class PartialFC(nn.Module):
    """``loss(embeddings, labels)`` of a PML margin loss (``margin_loss``, built for S = ceil(C / W) classes: its
    ``W`` is this rank's shard, D x S*k) over C classes sharded across the process group; ``rate``: the share of
    this shard's negative centres each step keeps (every positive is always kept)."""

    def __init__(self, margin_loss: nn.Module, num_classes: int, rate: float = 1.0, *, subcenters: int = 1):
        super().__init__()
        if not 0 < rate <= 1:
            raise InputError(f"loss.partial_fc must be in (0, 1] (1.0: every centre, sharded), got {rate}")
        self.rank, self.world_size = world()
        if num_classes < self.world_size:
            raise InputError(f"Partial FC shards {num_classes} classes over {self.world_size} processes: it needs at "
                             "least one class per process")
        self.loss, self.num_classes, self.rate, self.k = margin_loss, num_classes, float(rate), subcenters
        self.per_rank = shard_size(num_classes, self.world_size)
        self.first = self.rank * self.per_rank  # this shard's first class
        self.num_local = max(0, min(self.per_rank, num_classes - self.first))  # real classes (the rest: padding)
        self.last_sampled: Optional[torch.Tensor] = None  # the shard's classes the last step used (tests read it)
        # The centres are not part of the module's state dict: each rank's differ, and their shape depends on the
        # world size, so accelerate's model file (the main process's) could not be loaded on another world size.
        # They are saved per rank by shard_state (training/checkpoint.py writes one file per rank).
        self.register_state_dict_post_hook(_drop_centres)
        self.register_load_state_dict_post_hook(_centres_not_missing)

    @property
    def weight(self) -> nn.Parameter:
        return self.loss.W

    def ddp_ignored(self, prefix: str) -> list[str]:
        """Parameter names DDP must leave alone (they differ between ranks), given this module's name in the
        wrapped model."""
        return [f"{prefix}.loss.W"]

    def sample(self, positives: torch.Tensor) -> torch.Tensor:
        """Sorted shard-local classes to use this step: every positive, plus random others up to ``rate``."""
        device = self.weight.device
        if self.rate >= 1 or not self.training:
            return torch.arange(self.num_local, device=device)
        keep = max(len(positives), math.ceil(self.rate * self.num_local))
        order = torch.rand(self.num_local, device=device)
        order[positives] = 2.0  # above any random draw: positives first
        return order.topk(keep).indices.sort().values

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            embeddings, labels = _GatherWithGradient.apply(embeddings), _gather_labels(labels)
        local = (labels >= self.first) & (labels < self.first + self.num_local)
        shifted = labels - self.first
        classes = self.sample(torch.unique(shifted[local]))
        self.last_sampled = classes + self.first
        columns = (classes[:, None] * self.k + torch.arange(self.k, device=classes.device)).reshape(-1)
        cosine = self.loss.distance(embeddings, self.weight[:, columns].t())  # PML normalises both sides
        if self.k > 1:
            cosine = cosine.view(len(embeddings), len(classes), self.k).max(dim=2).values
        target = torch.full_like(labels, -1)
        target[local] = torch.searchsorted(classes, shifted[local])
        rows = torch.nonzero(local).squeeze(1)
        plain = cosine[rows, target[rows]]
        margin = torch.zeros_like(cosine)
        margin[rows, target[rows]] = self.loss.modify_cosine_of_target_classes(plain) - plain
        logits = self.loss.scale_logits(cosine + margin, embeddings)
        return _ShardedCrossEntropy.apply(logits, target)

    # ------------------------------------------------------------------ checkpoints
    def shard_state(self, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
        """This rank's centres (and their optimizer state) with where they sit among all classes."""
        state = (optimizer.state.get(self.weight, {}) if optimizer is not None else {})
        return {"rank": self.rank, "world_size": self.world_size, "num_classes": self.num_classes, "k": self.k,
                "weight": self.weight.detach().cpu().clone(),
                "optimizer": {key: value.detach().cpu().clone() if torch.is_tensor(value) else value
                              for key, value in state.items()}}

    def load_shards(self, shards: Sequence[dict], optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Take this rank's centres (and optimizer state) from the shards of any world size (re-sharded)."""
        mine = reshard(shards, self.rank, self.world_size)
        if mine["num_classes"] != self.num_classes or mine["k"] != self.k:
            raise InputError(f"the checkpoint's Partial FC holds {mine['num_classes']} classes x {mine['k']} centres, "
                             f"this run {self.num_classes} x {self.k}: resume with the data set it was trained on")
        with torch.no_grad():
            self.weight.copy_(mine["weight"].to(self.weight))
        if optimizer is not None and mine["optimizer"]:
            optimizer.state[self.weight] = {
                key: value.to(self.weight.device) if torch.is_tensor(value) and value.dim() else value
                for key, value in mine["optimizer"].items()}


def _drop_centres(module: PartialFC, state: dict, prefix: str, local_metadata) -> None:
    state.pop(prefix + "loss.W", None)


def _centres_not_missing(module: PartialFC, incompatible) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.endswith("loss.W")]


def reshard(shards: Sequence[dict], rank: int, world_size: int) -> dict:
    """One rank's share of centres saved by ``shards`` (one ``shard_state`` per rank of the saving run, or only this
    rank's own when the world size is the same), for a run of ``world_size`` ranks: the columns are laid end to end in class order, the old padding dropped, new padding
    added. Optimizer tensors shaped like the centres are split the same way; the others (a step count) are kept."""
    shards = sorted(shards, key=lambda s: s["rank"])
    first = shards[0]
    if len(shards) == 1 and (first["rank"], first["world_size"]) == (rank, world_size):
        return first  # the rank's own shard, saved on the same world size: nothing to lay end to end
    if [s["rank"] for s in shards] != list(range(first["world_size"])):
        raise InputError(f"Partial FC checkpoint: expected the centres of {first['world_size']} ranks, found ranks "
                         f"{[s['rank'] for s in shards]}; the checkpoint is incomplete")
    classes, k = first["num_classes"], first["k"]
    per_rank = shard_size(classes, world_size)
    start, stop = rank * per_rank * k, (rank + 1) * per_rank * k

    def split(tensors: list[torch.Tensor]) -> torch.Tensor:
        whole = torch.cat(tensors, dim=1)[:, :classes * k]
        padded = torch.cat([whole, whole.new_zeros(whole.shape[0], max(0, stop - whole.shape[1]))], dim=1)
        return padded[:, start:stop].clone()

    optimizer = {}
    for key, value in first["optimizer"].items():
        if torch.is_tensor(value) and value.shape == first["weight"].shape:
            optimizer[key] = split([s["optimizer"][key] for s in shards])
        else:
            optimizer[key] = value
    return {"num_classes": classes, "k": k, "weight": split([s["weight"] for s in shards]), "optimizer": optimizer}


def exclude_from_ddp(module: torch.nn.Module, names: list[str]) -> None:
    """Make DistributedDataParallel leave these parameters alone (no broadcast at start, no gradient all-reduce).

    DDP has no public way to do this; its private static method sets the attribute that ``DDP.__init__`` reads. It is
    called through this one guarded function so that a torch release that renames it fails here, in one clear line,
    instead of DDP silently averaging every rank's different centres (tests/test_partial_fc.py checks the effect on
    two gloo ranks).
    """
    from torch.nn.parallel import DistributedDataParallel

    setter = getattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None)
    if setter is None:
        raise RuntimeError(f"torch {torch.__version__}: DistributedDataParallel has no "
                           "_set_params_and_buffers_to_ignore_for_model any more, so Partial FC cannot keep each "
                           "rank's class centres out of DDP; train without loss.partial_fc or use an earlier torch")
    setter(module, names)
