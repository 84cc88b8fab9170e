"""Metric-learning losses by name, from pytorch-metric-learning parts (loss = distance + miner), DDP-correct.

Two families:
- pair losses (triplet, contrastive, multisimilarity) compare embeddings with each other. Under DDP each
  rank sees only its slice of the batch, so PML's DistributedLossWrapper/DistributedMinerWrapper gather the
  global batch (the local part keeps its gradient) and multiply the loss by world_size: DDP then averages
  gradients over ranks, and (1/W) * sum_r W * dL/d(emb_r) is exactly the gradient of the global-batch loss.
  The *value* is W times the loss, so ``Criterion.forward`` returns it divided back for logging.
- margin classification losses (arcface, subcenter_arcface, cosface) hold class centres: trained parameters
  that live inside the module the trainer hands to DDP, so they are in the optimizer, identical on every rank
  (gradients all-reduced like any weight) and saved with every checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from pytorch_metric_learning import distances, losses, miners
from pytorch_metric_learning.utils import distributed as pml_dist

from .config import LossConfig

PAIR_LOSSES = ("triplet", "contrastive", "multisimilarity")
CLASSIFICATION_LOSSES = ("arcface", "subcenter_arcface", "cosface")


def _distance(cfg: LossConfig) -> distances.BaseDistance:
    if cfg.distance == "cosine":
        return distances.CosineSimilarity()
    return distances.LpDistance(normalize_embeddings=True, p=2)


def _kwargs(**kw: object) -> dict:
    """Drop None values so PML's own defaults apply."""
    return {k: v for k, v in kw.items() if v is not None}


def build_pml_loss(cfg: LossConfig, embedding_dim: int, num_classes: int) -> losses.BaseMetricLossFunction:
    """The bare PML loss for cfg (no distributed wrapping)."""
    if cfg.loss == "triplet":
        return losses.TripletMarginLoss(distance=_distance(cfg), **_kwargs(margin=cfg.margin))
    if cfg.loss == "contrastive":
        # With cosine similarity, pos_margin is the similarity positives must reach, neg_margin the ceiling for negatives.
        if cfg.distance == "cosine":
            return losses.ContrastiveLoss(distance=_distance(cfg), pos_margin=1.0,
                                          neg_margin=cfg.margin if cfg.margin is not None else 0.5)
        return losses.ContrastiveLoss(distance=_distance(cfg), **_kwargs(neg_margin=cfg.margin))
    if cfg.loss == "multisimilarity":
        return losses.MultiSimilarityLoss(distance=distances.CosineSimilarity(), **_kwargs(base=cfg.margin))
    if cfg.loss == "arcface":
        return losses.ArcFaceLoss(num_classes=num_classes, embedding_size=embedding_dim, **_kwargs(margin=cfg.margin, scale=cfg.scale))
    if cfg.loss == "subcenter_arcface":
        return losses.SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=embedding_dim,
                                           sub_centers=cfg.subcenters,
                                           **_kwargs(margin=cfg.margin, scale=cfg.scale))
    if cfg.loss == "cosface":
        return losses.CosFaceLoss(num_classes=num_classes, embedding_size=embedding_dim, **_kwargs(margin=cfg.margin, scale=cfg.scale))
    raise ValueError(f"unknown loss {cfg.loss!r}; choose from {PAIR_LOSSES + CLASSIFICATION_LOSSES}")


def build_miner(cfg: LossConfig) -> miners.BaseMiner | None:
    """The miner that picks which pairs/triplets a pair loss trains on (None: all of them)."""
    if cfg.miner == "none":
        return None
    if cfg.loss in CLASSIFICATION_LOSSES:
        raise ValueError(f"miner {cfg.miner!r} applies to pair losses, not {cfg.loss!r}")
    if cfg.miner == "semihard":
        return miners.TripletMarginMiner(margin=cfg.margin or 0.1, type_of_triplets="semihard", distance=_distance(cfg))
    if cfg.miner == "hard":
        return miners.TripletMarginMiner(margin=cfg.margin or 0.1, type_of_triplets="hard", distance=_distance(cfg))
    if cfg.miner == "multisimilarity":
        return miners.MultiSimilarityMiner(distance=distances.CosineSimilarity())
    raise ValueError(f"unknown miner {cfg.miner!r}")


class Criterion(nn.Module):
    """loss(embeddings, labels) on the global batch for pair losses, on the local batch for class-centre losses.

    Call it in fp32 (the trainer disables autocast around it). Returns the loss to back-propagate and its
    value for logging (they differ by world_size for gathered pair losses, see the module docstring).
    """

    def __init__(self, cfg: LossConfig, embedding_dim: int, num_classes: int):
        super().__init__()
        self.name = cfg.loss
        self.loss = build_pml_loss(cfg, embedding_dim, num_classes)
        self.miner = build_miner(cfg)
        self.is_pair_loss = cfg.loss in PAIR_LOSSES

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = embeddings.float()
        world = torch.distributed.get_world_size() if pml_dist.is_distributed() else 1
        if self.is_pair_loss and world > 1:
            indices = None
            if self.miner is not None:
                indices = pml_dist.DistributedMinerWrapper(self.miner)(embeddings, labels)
            loss = pml_dist.DistributedLossWrapper(self.loss)(embeddings, labels, indices)
            return loss, loss.detach() / world
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        loss = self.loss(embeddings, labels, indices)
        return loss, loss.detach()
