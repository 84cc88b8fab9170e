"""Metric-learning losses by name, from pytorch-metric-learning parts (loss = distance + miner), DDP-correct.

``LOSSES`` and ``MINERS`` (facesiam/registry.py) hold the choices; a new loss is one registered build function. Two
families (a loss entry's ``family`` info):
- pair losses (triplet, contrastive, multisimilarity) compare embeddings with each other. Under DDP each
  rank sees only its slice of the batch, so PML's DistributedLossWrapper/DistributedMinerWrapper gather the
  global batch (the local part keeps its gradient) and multiply the loss by world_size: DDP then averages
  gradients over ranks, and (1/W) * sum_r W * dL/d(emb_r) is exactly the gradient of the global-batch loss.
  The *value* is W times the loss, so ``Criterion.forward`` returns it divided back for logging.
- margin classification losses (arcface, subcenter_arcface, cosface) hold class centres: trained parameters
  that live inside the module the trainer hands to DDP, so they are in the optimizer, identical on every rank
  (gradients all-reduced like any weight) and saved with every checkpoint. With ``loss.partial_fc`` they are
  sharded across ranks instead (facesiam/partial_fc.py: Partial FC).

A margin loss can also be paired with a pair loss (``loss.pair_loss``, weighted ``loss.pair_loss_weight``): the class
centres pull each identity together against all others, the pair loss shapes the batch's own neighbourhoods.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners
from pytorch_metric_learning.utils import distributed as pml_dist

from .errors import InputError
from .partial_fc import PartialFC, shard_size, world
from .registry import Registry

if TYPE_CHECKING:  # config imports this module (to validate names against LOSSES and MINERS)
    from .config import LossConfig, TrainConfig

log = logging.getLogger("facesiam.train")

LOSSES = Registry("loss")
"""name -> build(cfg: LossConfig, embedding_dim, num_classes) -> a bare PML loss; info ``family``: pair | margin, and
the loss's own defaults ``margin`` / ``scale`` as (value, unit) where it has that knob (resolve_loss_defaults)."""
MINERS = Registry("miner")
"""name -> build(cfg: LossConfig) -> a PML miner, or None (``none``: every pair/triplet of the batch)."""


def _distance(cfg: LossConfig) -> distances.BaseDistance:
    if cfg.distance == "cosine":
        return distances.CosineSimilarity()
    return distances.LpDistance(normalize_embeddings=True, p=2)


def check_loss_config(cfg: LossConfig) -> None:
    """The loss, its added pair loss, miner and centre initialisation fit together (InputError, one line, if not)."""
    family = LOSSES.get(cfg.loss).info["family"]
    MINERS.get(cfg.miner)
    pair_losses, margin_losses = LOSSES.names(family="pair"), LOSSES.names(family="margin")
    if family == "pair":
        if cfg.pair_loss != "none":
            raise InputError(f"loss.pair_loss ({cfg.pair_loss!r}) adds a pair loss to a margin loss "
                             f"({', '.join(margin_losses)}), not to {cfg.loss!r}")
        if cfg.init_centres == "imprint":
            raise InputError(f"loss.init_centres imprint needs class centres: a margin loss, not {cfg.loss!r}")
        if cfg.partial_fc:
            raise InputError(f"loss.partial_fc shards class centres: it needs a margin loss "
                             f"({', '.join(margin_losses)}), not {cfg.loss!r}")
        return
    if cfg.partial_fc and family != "margin":
        raise InputError(f"loss.partial_fc shards class centres: it needs a margin loss ({', '.join(margin_losses)}), "
                         f"not {cfg.loss!r}")
    if cfg.partial_fc and not 0 < cfg.partial_fc <= 1:
        raise InputError(f"loss.partial_fc must be in (0, 1] (1.0: every centre, sharded), got {cfg.partial_fc}")
    if cfg.pair_loss not in ("none",) + pair_losses:
        raise InputError(f"loss.pair_loss is {cfg.pair_loss!r}; choose none or a pair loss: {', '.join(pair_losses)}")
    if cfg.miner != "none" and cfg.pair_loss == "none":
        raise InputError(f"miner {cfg.miner!r} applies to pair losses, not {cfg.loss!r} (set loss.pair_loss to add one)")


ARC_DEGREES = "degrees of angular margin, as in PML (28.6 deg = 0.5 rad, arcface_torch's m=0.5)"
SCALE = "logit scale s (PML's and arcface_torch's 64)"


def loss_defaults(cfg: LossConfig) -> dict[str, tuple[float, str]]:
    """The chosen loss's own defaults for ``margin`` and ``scale``: name -> (value, unit); none for a knob it lacks.

    An entry's default is a (value, unit) pair, or a function of the LossConfig where it depends on another field
    (contrastive: on the distance)."""
    info = LOSSES.get(cfg.loss).info
    return {key: info[key](cfg) if callable(info[key]) else info[key] for key in ("margin", "scale") if key in info}


def resolve_loss_defaults(cfg: LossConfig) -> LossConfig:
    """``cfg`` with margin and scale that are None set to the chosen loss's own defaults (loss_defaults).

    One default per loss, not one per field: a margin of 0.1 means a triplet margin in cosine distance but a tenth of
    a degree for ArcFace. Resolved values are what RUN/config.yaml records.
    """
    defaults = loss_defaults(cfg)
    values = {key: defaults[key][0] for key in ("margin", "scale") if getattr(cfg, key) is None and key in defaults}
    return dataclasses.replace(cfg, **values) if values else cfg


def _check(cfg: TrainConfig) -> None:
    check_loss_config(cfg.loss)
    margin = cfg.loss.margin
    if loss_defaults(cfg.loss).get("margin", (None, ""))[1] == ARC_DEGREES and margin is not None and 0 < margin < 1:
        log.warning("loss.margin %g for %s is in degrees (as in PML): almost no margin; if you meant %g rad "
                    "(arcface_torch's unit), that is --margin %.1f", margin, cfg.loss.loss, margin, math.degrees(margin))


@LOSSES.register("triplet", family="pair", check=_check, margin=(0.1, "cosine distance (1 - similarity): the seed "
                 "article's; PML's own is 0.05"))
def _triplet(cfg: LossConfig, embedding_dim: int, num_classes: int) -> losses.BaseMetricLossFunction:
    """a pair loss, TripletMarginLoss with loss.margin and loss.distance (the seed article's)."""
    return losses.TripletMarginLoss(distance=_distance(cfg), margin=cfg.margin)


@LOSSES.register("contrastive", family="pair", check=_check, margin=lambda cfg: (
    (0.5, "cosine similarity that negatives are pushed below") if cfg.distance == "cosine"
    else (1.0, "euclidean distance that negatives are pushed beyond (PML's default)")))
def _contrastive(cfg: LossConfig, embedding_dim: int, num_classes: int) -> losses.BaseMetricLossFunction:
    """a pair loss, ContrastiveLoss (with cosine, negatives pushed below loss.margin)."""
    # With cosine similarity, pos_margin is the similarity positives must reach, neg_margin the ceiling for negatives.
    if cfg.distance == "cosine":
        return losses.ContrastiveLoss(distance=_distance(cfg), pos_margin=1.0, neg_margin=cfg.margin)
    return losses.ContrastiveLoss(distance=_distance(cfg), neg_margin=cfg.margin)


@LOSSES.register("multisimilarity", family="pair", check=_check,
                 margin=(0.5, "cosine similarity: the loss's base (PML's default)"))
def _multisimilarity(cfg: LossConfig, embedding_dim: int, num_classes: int) -> losses.BaseMetricLossFunction:
    """a pair loss, MultiSimilarityLoss (cosine; loss.margin is its base)."""
    return losses.MultiSimilarityLoss(distance=distances.CosineSimilarity(), base=cfg.margin)


@LOSSES.register("arcface", family="margin", check=_check, margin=(28.6, ARC_DEGREES), scale=(64.0, SCALE))
def _arcface(cfg: LossConfig, embedding_dim: int, num_classes: int) -> losses.BaseMetricLossFunction:
    """a margin loss, ArcFaceLoss (loss.margin in degrees, loss.scale)."""
    return losses.ArcFaceLoss(num_classes=num_classes, embedding_size=embedding_dim,
                              margin=cfg.margin, scale=cfg.scale)


@LOSSES.register("subcenter_arcface", family="margin", check=_check, margin=(28.6, ARC_DEGREES),
                 scale=(64.0, SCALE))
def _subcenter_arcface(cfg: LossConfig, embedding_dim: int, num_classes: int) -> losses.BaseMetricLossFunction:
    """a margin loss, SubCenterArcFaceLoss (loss.subcenters centres per class)."""
    return losses.SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=embedding_dim,
                                       sub_centers=cfg.subcenters, margin=cfg.margin, scale=cfg.scale)


@LOSSES.register("cosface", family="margin", check=_check,
                 margin=(0.35, "cosine subtracted from the true class's logit (PML's; arcface_torch uses 0.4)"),
                 scale=(64.0, SCALE))
def _cosface(cfg: LossConfig, embedding_dim: int, num_classes: int) -> losses.BaseMetricLossFunction:
    """a margin loss, CosFaceLoss (additive cosine margin, loss.scale)."""
    return losses.CosFaceLoss(num_classes=num_classes, embedding_size=embedding_dim,
                              margin=cfg.margin, scale=cfg.scale)


def _miner_margin(cfg: LossConfig) -> float:
    """A triplet miner's margin: the triplet loss's (loss.margin, resolved), else the triplet default."""
    triplet = cfg if cfg.loss == "triplet" else dataclasses.replace(cfg, loss="triplet", margin=None)
    return resolve_loss_defaults(triplet).margin


@MINERS.register("none")
def _no_miner(cfg: LossConfig) -> None:
    """every pair/triplet of the batch."""
    return None


@MINERS.register("semihard")
def _semihard(cfg: LossConfig) -> miners.BaseMiner:
    """semi-hard triplets (TripletMarginMiner, with the triplet loss's margin)."""
    return miners.TripletMarginMiner(margin=_miner_margin(cfg), type_of_triplets="semihard", distance=_distance(cfg))


@MINERS.register("hard")
def _hard(cfg: LossConfig) -> miners.BaseMiner:
    """hard triplets (TripletMarginMiner, with the triplet loss's margin)."""
    return miners.TripletMarginMiner(margin=_miner_margin(cfg), type_of_triplets="hard", distance=_distance(cfg))


@MINERS.register("multisimilarity")
def _multisimilarity_miner(cfg: LossConfig) -> miners.BaseMiner:
    """MultiSimilarityMiner (cosine)."""
    return miners.MultiSimilarityMiner(distance=distances.CosineSimilarity())


def build_pml_loss(cfg: LossConfig, embedding_dim: int, num_classes: int) -> losses.BaseMetricLossFunction:
    """The bare PML loss for cfg (no distributed wrapping; margin and scale left None take the loss's defaults)."""
    return LOSSES.get(cfg.loss).build(resolve_loss_defaults(cfg), embedding_dim, num_classes)


def build_miner(cfg: LossConfig) -> miners.BaseMiner | None:
    """The miner that picks which pairs/triplets a pair loss trains on (None: all of them)."""
    return MINERS.get(cfg.miner).build(cfg)


class PairTerm(nn.Module):
    """A pair loss (and its miner) on the global batch: under DDP, PML's wrappers gather every rank's embeddings."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.loss = build_pml_loss(cfg, 0, 0)
        self.miner = build_miner(resolve_loss_defaults(cfg))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        world = torch.distributed.get_world_size() if pml_dist.is_distributed() else 1
        if world > 1:
            indices = None
            if self.miner is not None:
                indices = pml_dist.DistributedMinerWrapper(self.miner)(embeddings, labels)
            loss = pml_dist.DistributedLossWrapper(self.loss)(embeddings, labels, indices)
            return loss, loss.detach() / world
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        loss = self.loss(embeddings, labels, indices)
        return loss, loss.detach()


class Criterion(nn.Module):
    """loss(embeddings, labels) on the global batch for pair losses, on the local batch for class-centre losses.

    Call it in fp32 (the trainer disables autocast around it). Returns the loss to back-propagate and its
    value for logging (they differ by world_size for gathered pair losses, see the module docstring).
    """

    def __init__(self, cfg: LossConfig, embedding_dim: int, num_classes: int):
        super().__init__()
        check_loss_config(cfg)  # config validation ran it already; a LossConfig built in code has not been through it
        self.name = cfg.loss if cfg.pair_loss == "none" else f"{cfg.loss}+{cfg.pair_loss_weight:g}*{cfg.pair_loss}"
        self.pair_loss_weight = cfg.pair_loss_weight
        self.pair = None
        if LOSSES.get(cfg.loss).info["family"] == "pair":
            self.loss, self.pair = None, PairTerm(cfg)
        elif cfg.partial_fc:
            per_rank = shard_size(num_classes, world()[1])
            self.loss = PartialFC(build_pml_loss(cfg, embedding_dim, per_rank), num_classes, cfg.partial_fc,
                                  subcenters=cfg.subcenters if cfg.loss == "subcenter_arcface" else 1)
        else:
            self.loss = build_pml_loss(cfg, embedding_dim, num_classes)
        if cfg.pair_loss != "none":
            # The pair term takes its own loss's default margin; loss.margin belongs to the margin loss.
            self.pair = PairTerm(dataclasses.replace(cfg, loss=cfg.pair_loss, margin=None, scale=None))

    @torch.no_grad()
    def imprint_centres(self, embeddings: torch.Tensor, labels: torch.Tensor, spread: float = 0.1) -> int:
        """Point each class centre at its class's mean embedding direction (weight imprinting: Qi, Brown, Lowe,
        "Low-Shot Learning with Imprinted Weights", CVPR 2018); returns how many classes were imprinted.

        Classes without embeddings keep their random centres. Each centre keeps its norm: the losses only use the
        direction, but Adam's steps are a fixed size per element, so the norm sets how fast a centre can turn.
        Sub-centres of one class start at the class mean plus ``spread`` times their own random direction, so
        that they are not identical (identical sub-centres would tie in the loss's max and never separate).
        """
        W = getattr(self.loss, "W", None) if self.loss is not None else None
        if self.partial is not None:  # this rank's shard: its classes, renumbered from 0
            W, first, num_classes = self.partial.weight, self.partial.first, self.partial.per_rank
            mine = (labels >= first) & (labels < first + num_classes)
            embeddings, labels = embeddings[mine], labels[mine] - first
        elif W is None:
            raise ValueError(f"loss {self.name!r} has no class centres to imprint")
        else:
            num_classes = self.loss.num_classes
        per_class = W.shape[1] // num_classes  # SubCenterArcFace lays out class c's sub-centres at c*k .. c*k+k-1
        embeddings = F.normalize(embeddings.float().to(W.device), dim=1)
        labels = labels.to(W.device)
        sums = torch.zeros(num_classes, W.shape[0], device=W.device).index_add_(0, labels, embeddings)
        counts = torch.bincount(labels, minlength=num_classes)
        means = F.normalize(sums, dim=1)  # (C, D)
        centres = W.t().reshape(num_classes, per_class, W.shape[0])  # (C, k, D); written back into W below
        norms = centres.norm(dim=2, keepdim=True)
        noise = F.normalize(centres, dim=2) * (spread if per_class > 1 else 0.0)
        imprinted = F.normalize(means[:, None, :] + noise, dim=2) * norms
        seen = counts > 0
        centres[seen] = imprinted[seen].to(W.dtype)
        W.copy_(centres.reshape(-1, W.shape[0]).t())
        return int(seen.sum())

    @property
    def partial(self):
        """The Partial FC module when the centres are sharded (loss.partial_fc), else None."""
        return self.loss if isinstance(self.loss, PartialFC) else None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = embeddings.float()
        if self.loss is None:
            return self.pair(embeddings, labels)
        loss = self.loss(embeddings, labels)
        value = loss.detach()
        if self.pair is not None:
            pair_loss, pair_value = self.pair(embeddings, labels)
            loss, value = loss + self.pair_loss_weight * pair_loss, value + self.pair_loss_weight * pair_value
        return loss, value
