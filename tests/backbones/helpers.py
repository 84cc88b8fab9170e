"""Shared by the backbone tests: anchor (arcface_torch) networks with non-trivial statistics, saved as its training
script saves them."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from facesiam.config import ModelConfig
from facesiam.model import build_model


def randomise_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine terms, every PReLU random slopes and every bias a
    random value, as a trained network has: a mapping that swapped two BN layers or dropped a bias would then show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.Conv2d):
                # fan-in scaled, so that a deep random network neither explodes nor vanishes in eval mode
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / (m.weight[0].numel() ** 0.5))
    return model


def save_anchor(anchor: nn.Module, path: Path) -> Path:
    """What arcface_torch's train_v2.py writes: ``torch.save(backbone.module.state_dict(), "model.pt")``."""
    torch.save(anchor.state_dict(), path)
    return path


def compare_with_anchor(anchor: nn.Module, backbone: str, path: Path, batch: int = 3) -> None:
    """Load the anchor's file through facesiam (--pretrained FILE) and check both compute the same embedding, in eval
    mode (running statistics) and in training mode (batch statistics)."""
    model = build_model(ModelConfig(backbone=backbone, head="face", image_size=112, pretrained=str(path)))
    images = torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    for train in (False, True):
        anchor.train(train)
        model.train(train)
        with torch.no_grad():
            expected = F.normalize(anchor(images), dim=-1)
            got = model(images)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
