"""facesiam/backbones/mobilefacenet.py against arcface_torch's own definition (tests/backbones/arcface_reference.py)."""

from __future__ import annotations

import pytest
import torch

from facesiam.backbones import BACKBONES
from facesiam.config import ModelConfig
from facesiam.model import build_model

from . import arcface_reference as anchor
from .helpers import compare_with_anchor, randomise_statistics, save_anchor


def _facesiam(**kw) -> torch.nn.Module:
    return build_model(ModelConfig(backbone="mobilefacenet", head="face", image_size=112, **kw))


def test_same_tensors_and_parameters_as_the_anchor():
    reference = anchor.get_mbf(fp16=False, num_features=512)
    ours = _facesiam()
    mapped = BACKBONES.get("mobilefacenet").info["from_arcface"](reference.state_dict())
    own = ours.state_dict()
    assert mapped.keys() == own.keys()
    assert all(mapped[k].shape == own[k].shape for k in own)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


def test_an_arcface_torch_backbone_pth_computes_the_same_embedding_in_facesiam(tmp_path):
    torch.manual_seed(0)
    reference = randomise_statistics(anchor.get_mbf(fp16=False, num_features=512))
    compare_with_anchor(reference, "mobilefacenet", save_anchor(reference, tmp_path / "backbone.pth"))


def test_shapes_and_every_parameter_trains():
    model = _facesiam().eval()
    images = torch.randn(2, 3, 112, 112)
    assert model.trunk(images).shape == (2, 512)
    out = model(images)
    assert out.shape == (2, 512)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    assert all(p.requires_grad for p in model.parameters()), "arcface_torch freezes nothing in MobileFaceNet"


def test_channels_last_bf16_training_step_on_cpu():
    torch.manual_seed(0)
    model = _facesiam().to(memory_format=torch.channels_last).train()
    images = torch.randn(4, 3, 112, 112).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        fp32 = model(images)
    assert torch.nn.functional.cosine_similarity(out.detach(), fp32).min() > 0.98


@pytest.mark.slow
def test_exports_to_onnx_with_the_same_embeddings(tmp_path):
    pytest.importorskip("onnxruntime")
    from facesiam.export import export_onnx
    from facesiam.model import export_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mobilefacenet", head="face", image_size=112)
    best = export_model(build_model(cfg).eval(), cfg, tmp_path / "best")
    summary = export_onnx(best, tmp_path / "model.onnx")
    assert summary["backbone"] == "mobilefacenet" and summary["min_cosine"] > 0.9999
