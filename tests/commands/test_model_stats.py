"""The model-stats command (facesiam/commands/model_stats.py) against the published figures and the anchor's own
networks."""

from __future__ import annotations

import pytest
import torch

from facesiam.commands.model_stats import main as model_stats_command
from facesiam.commands.model_stats import model_stats
from facesiam.config import ModelConfig

from ..backbones import arcface_reference as anchor

# arcface_torch README (deepinsight/insightface @ 7fadd420, recognition/arcface_torch/README.md): the FLOPs column of
# "ViT For Face Recognition" (r18 2.6, r50 6.3, r100 12.1, r200 23.5) and "mobilefacenet-0.45G" in the model zoo
# (model_zoo/README.md: "450M FLOPs"). They come from its flops.py: ptflops' multiply-accumulates, plus ptflops' count
# of BatchNorm and PReLU element operations, rounded to 0.1 (0.05 for mbf). MACs of the convolutions and the FC are
# the bulk: within 4% (MobileFaceNet's depthwise layers make the element operations a larger share, ~3%).
PUBLISHED_GMACS = {"iresnet18": 2.6, "iresnet50": 6.3, "iresnet100": 12.1, "iresnet200": 23.5, "mobilefacenet": 0.45}


@pytest.mark.parametrize("name,published", PUBLISHED_GMACS.items())
def test_compute_matches_arcface_torchs_published_gflops(name, published):
    stats = model_stats(ModelConfig(backbone=name, head="face", image_size=112))
    assert stats.gmacs == pytest.approx(published, rel=0.04)
    assert stats.flops == pytest.approx(2e9 * stats.gmacs)


def _anchor(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return anchor.get_mbf(False, 512) if name == "mobilefacenet" else getattr(anchor, name)()


@pytest.mark.parametrize("name", ["iresnet50", "iresnet100", "mobilefacenet"])
def test_parameters_are_the_anchors(name):
    """arcface_torch publishes no parameter counts; its own networks are the reference (iresnet50 43.6M and
    iresnet100 65.2M as commonly quoted; facesiam's FC has no bias: 512 fewer, folded into the BatchNorm after it)."""
    reference = _anchor(name)
    stats = model_stats(ModelConfig(backbone=name, head="face", image_size=112))
    fc_bias = 0 if name == "mobilefacenet" else 512
    assert stats.params == sum(p.numel() for p in reference.parameters()) - fc_bias
    assert stats.trainable == sum(p.numel() for p in reference.parameters() if p.requires_grad) - fc_bias
    quoted = {"iresnet50": 43.6e6, "iresnet100": 65.2e6, "mobilefacenet": 2.0e6}[name]
    assert stats.params == pytest.approx(quoted, rel=0.05)


def test_a_timm_backbone_is_counted_too():
    stats = model_stats(ModelConfig(backbone="test_efficientnet", image_size=32, embedding_dim=16))
    assert stats.params > 0 and stats.flops > 0


def test_command_prints_a_row_per_backbone(capsys):
    rows = model_stats_command(["iresnet18", "mobilefacenet"])
    out = capsys.readouterr().out
    assert [r["backbone"] for r in rows] == ["iresnet18", "mobilefacenet"]
    assert "iresnet18" in out and f"{rows[0]['gmacs']:.3f}" in out and "112x112" in out
