"""facesiam/backbones/iresnet.py against arcface_torch's own definition (tests/backbones/arcface_reference.py)."""

from __future__ import annotations

import pytest
import torch

from facesiam.backbones import BACKBONES
from facesiam.backbones.iresnet import IRESNET_LAYERS
from facesiam.config import ModelConfig
from facesiam.model import build_model

from . import arcface_reference as anchor
from .helpers import compare_with_anchor, randomise_statistics, save_anchor


def _facesiam(name: str, **kw) -> torch.nn.Module:
    return build_model(ModelConfig(backbone=name, head="face", image_size=112, **kw))


@pytest.mark.parametrize("name", list(IRESNET_LAYERS))
def test_same_tensors_as_the_anchor_but_the_bias_folded_into_the_last_batchnorm(name):
    with torch.device("meta"):  # shapes only: iresnet200 costs nothing
        reference = getattr(anchor, name)().state_dict()
        ours = _facesiam(name)
    mapped = BACKBONES.get(name).info["from_arcface"](reference)
    own = ours.state_dict()
    assert mapped.keys() == own.keys()
    assert all(mapped[k].shape == own[k].shape for k in own)
    anchor_params = sum(p.numel() for p in getattr(anchor, name)().parameters())
    assert sum(p.numel() for p in ours.parameters()) == anchor_params - 512, "all but fc's 512 biases"


@pytest.mark.parametrize("name", ["iresnet18", "iresnet50"])
def test_an_arcface_torch_backbone_pth_computes_the_same_embedding_in_facesiam(name, tmp_path):
    torch.manual_seed(0)
    reference = randomise_statistics(getattr(anchor, name)())
    compare_with_anchor(reference, name, save_anchor(reference, tmp_path / "backbone.pth"))


def test_shapes_and_the_frozen_embedding_scale():
    model = _facesiam("iresnet18").eval()
    images = torch.randn(2, 3, 112, 112)
    assert model.trunk(images).shape == (2, 512, 7, 7)
    out = model(images)
    assert out.shape == (2, 512) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    # arcface_torch: self.features.weight.requires_grad = False (the embedding BN's scale stays 1)
    assert not model.head[-1].weight.requires_grad and (model.head[-1].weight == 1).all()
    assert all(p.requires_grad for p in model.trunk.parameters())


def test_other_embedding_sizes_and_the_linear_head():
    model = build_model(ModelConfig(backbone="iresnet18", head="linear", embedding_dim=128, image_size=112)).eval()
    assert model(torch.randn(2, 3, 112, 112)).shape == (2, 128)


def test_channels_last_bf16_forward_on_cpu():
    torch.manual_seed(0)
    model = _facesiam("iresnet18").to(memory_format=torch.channels_last).train()  # batch statistics: no running ones
    images = torch.randn(2, 3, 112, 112).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
        fp32 = model(images)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # bf16 keeps ~3 significant digits: the same embedding, to rounding
    assert torch.nn.functional.cosine_similarity(out, fp32).min() > 0.98
