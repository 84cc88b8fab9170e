"""Knowledge distillation from a face teacher: the student learns to reproduce the teacher's embedding of each photo.

The teacher (facesiam/faces/teachers.py: dlib's ResNet descriptor, or any ONNX face embedder) embeds every training
photo once, from the original photo preprocessed its own way; training/teacher_pass.py caches those embeddings
beside the shards. The student sees its own augmented, aligned view of the same photo, so the targets are fixed
per photo and the loss below compares them with the student's embedding of the view. No labels are used, unless
``distill.label_weight`` adds the run's metric loss on them in the same step.

The loss is the angular distillation loss of ShrinkTeaNet (Duong et al., "ShrinkTeaNet: Million-scale Lightweight
Face Recognition via Shrinking Teacher-Student Networks", 2019): 1 - cos(P(s), t), with P a linear projection to
the teacher's size when the sizes differ (none when they agree: the student's embedding itself then becomes the
teacher's). The optional relational term matches the batch's cosine-similarity matrix of the student's own
embeddings to the teacher's, which constrains the geometry inference uses (the student's embedding, not P's
output): similarity-preserving distillation (Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019),
with cosine similarities in place of their row-normalised Gram matrices. The optional bank term widens that
geometry from the batch to the training set: each photo's similarity distribution over a bank of the teacher's
embeddings of training photos (softmax of cosines / temperature), the student's matched to the teacher's by KL
divergence, as SEED does with a queue (Fang et al., "SEED: Self-supervised Distillation For Visual
Representation", ICLR 2021); here the targets are cached, so the bank is up to ``bank_size`` of them, no queue.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class DistillCriterion(nn.Module):
    """loss(student embeddings, sample indices): the indices pick the teacher targets of the batch's photos.

    Photos the teacher found no face in carry no target (``found`` false) and count for nothing in the loss. Called
    like ``losses.Criterion`` (fp32, returns the loss to back-propagate and its value for logging).
    """

    name = "distill"

    def __init__(self, embedding_dim: int, teacher_dim: int, relational_weight: float = 0.0,
                 label_loss: Optional[nn.Module] = None, label_weight: float = 0.0, bank_weight: float = 0.0,
                 bank_temperature: float = 0.07, bank_size: int = 16384):
        super().__init__()
        # A projection only when the sizes differ; it is trained with the student and dropped at export.
        self.projection = nn.Linear(embedding_dim, teacher_dim, bias=False) if embedding_dim != teacher_dim else None
        self.relational_weight = relational_weight
        # distill.label_weight: the metric loss on the photos' labels (losses.Criterion), trained in the same step.
        # A submodule, so that DDP synchronises its class centres like the student's weights.
        self.label_loss = label_loss if label_weight else None
        self.label_weight = label_weight
        self.bank_weight, self.bank_temperature, self.bank_size = bank_weight, bank_temperature, bank_size
        self.bank: Optional[torch.Tensor] = None     # (K, teacher_dim): the targets the bank term compares with
        self.targets: Optional[torch.Tensor] = None  # (N, teacher_dim) unit rows; a plain attribute: DDP must not
        self.found: Optional[torch.Tensor] = None    # broadcast it as a buffer at every step
        self.labels: Optional[torch.Tensor] = None   # (N,) identity of dataset index i, for the label loss

    def set_targets(self, targets: np.ndarray | torch.Tensor, found: np.ndarray | torch.Tensor,
                    device: torch.device | str = "cpu") -> None:
        """The teacher's embedding of every training photo (row i: dataset index i) and whether it found a face."""
        self.targets = F.normalize(torch.as_tensor(np.asarray(targets), dtype=torch.float32), dim=1).to(device)
        self.found = torch.as_tensor(np.asarray(found), dtype=torch.bool).to(device)
        if self.bank_weight:
            rows = torch.nonzero(self.found.cpu()).squeeze(1)
            if len(rows) > self.bank_size:  # a fixed subset: the same in every process and after a resume
                pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:self.bank_size]
                rows = rows[pick.sort().values]
            self.bank = self.targets[rows.to(self.targets.device)]

    def set_labels(self, labels: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> None:
        """The identity of every training photo (row i: dataset index i): the batch carries indices, not labels."""
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).to(device)

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The student's embeddings in the teacher's space, unit length."""
        out = embeddings if self.projection is None else self.projection(embeddings)
        return F.normalize(out.float(), dim=1)

    def forward(self, embeddings: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.targets is None:
            raise RuntimeError("DistillCriterion.set_targets was not called: no teacher embeddings")
        indices = indices.to(self.targets.device)
        keep = self.found[indices].to(embeddings.device)
        teacher = self.targets[indices].to(embeddings.device)
        weight = keep.float() / keep.sum().clamp(min=1)
        projected = self.project(embeddings)
        cosine = (projected * teacher).sum(dim=1)
        loss = ((1 - cosine) * weight).sum()
        if self.bank_weight:
            bank = self.bank.to(embeddings.device)
            student = F.log_softmax(projected @ bank.t() / self.bank_temperature, dim=1)
            wanted = F.log_softmax(teacher @ bank.t() / self.bank_temperature, dim=1)
            divergence = F.kl_div(student, wanted, log_target=True, reduction="none").sum(dim=1)
            loss = loss + self.bank_weight * (divergence * weight).sum()
        if self.relational_weight:
            s = F.normalize(embeddings.float(), dim=1)
            pair = weight[:, None] * weight[None, :]
            loss = loss + self.relational_weight * ((s @ s.t() - teacher @ teacher.t()) ** 2 * pair).sum() / pair.sum(
            ).clamp(min=1e-12)
        if self.label_loss is not None:
            if self.labels is None:
                raise RuntimeError("DistillCriterion.set_labels was not called: the label loss has no labels")
            labelled, _ = self.label_loss(embeddings, self.labels[indices].to(embeddings.device))
            loss = loss + self.label_weight * labelled
        return loss, loss.detach()


def teacher_cosine(criterion: DistillCriterion, embeddings: np.ndarray, targets: np.ndarray,
                   found: np.ndarray) -> Optional[float]:
    """Mean cosine between the student's projected embeddings and the teacher's, over the photos with a target."""
    if not found.any():
        return None
    with torch.no_grad():
        device = next(criterion.parameters()).device if criterion.projection is not None else torch.device("cpu")
        s = criterion.project(torch.as_tensor(embeddings[found], dtype=torch.float32, device=device)).cpu()
    t = F.normalize(torch.as_tensor(targets[found], dtype=torch.float32), dim=1)
    return float((s * t).sum(dim=1).mean())
