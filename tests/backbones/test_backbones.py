"""facesiam/backbones/__init__.py: the registry beside timm, the checks of a face backbone's config, and
--pretrained with arcface_torch and facesiam files."""

from __future__ import annotations

import logging

import pytest
import torch

from facesiam.backbones import BACKBONES
from facesiam.config import ModelConfig, config_from_overrides
from facesiam.errors import InputError
from facesiam.model import PretrainedWeightsError, build_model, export_model, load_exported

from . import arcface_reference as anchor
from .helpers import randomise_statistics, save_anchor


def test_registry_names_and_timm_names_side_by_side():
    assert BACKBONES.names() == ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "mobilefacenet")
    cfg = config_from_overrides(None, {"backbone": "iresnet50", "image_size": 112, "head": "face"})
    with torch.device("meta"):
        assert type(build_model(cfg.model).trunk).__name__ == "IResNetTrunk"
        timm_model = build_model(ModelConfig(backbone="test_efficientnet", image_size=32))
    assert type(timm_model.trunk).__module__.startswith("timm."), "any other name is still a timm model"
    with pytest.raises(InputError, match="unknown backbone 'iresnet51'"):
        build_model(ModelConfig(backbone="iresnet51"))


def test_face_backbones_need_112_pixels_and_have_no_hub_weights():
    with pytest.raises(InputError, match="needs model.image_size 112.*set --image-size 112"):
        build_model(ModelConfig(backbone="mobilefacenet", head="face", image_size=224))
    with pytest.raises(InputError, match="no model-hub weights"):
        build_model(ModelConfig(backbone="mobilefacenet", head="face", image_size=112, pretrained="hub"))


@pytest.fixture(scope="module")
def r18_pth(tmp_path_factory):
    torch.manual_seed(0)
    reference = randomise_statistics(anchor.iresnet18())
    return save_anchor(reference, tmp_path_factory.mktemp("anchor") / "backbone.pth"), reference


def test_an_arcface_file_for_another_architecture_names_the_right_backbone(r18_pth):
    with pytest.raises(PretrainedWeightsError, match=r"arcface_torch r18 \(iresnet18\).*set --backbone iresnet18"):
        build_model(ModelConfig(backbone="iresnet34", head="face", image_size=112, pretrained=str(r18_pth[0])))
    with pytest.raises(PretrainedWeightsError, match="arcface_torch r18"):
        build_model(ModelConfig(backbone="mobilefacenet", head="face", image_size=112, pretrained=str(r18_pth[0])))


def test_a_file_of_something_else_is_one_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(PretrainedWeightsError, match="neither an arcface_torch backbone state dict nor a facesiam"):
        build_model(ModelConfig(backbone="iresnet18", head="face", image_size=112, pretrained=str(path)))
    with pytest.raises(PretrainedWeightsError, match="not found"):
        build_model(ModelConfig(backbone="iresnet18", head="face", image_size=112, pretrained=str(tmp_path / "no.pth")))


def test_another_embedding_size_keeps_the_trunk_and_starts_a_new_head(r18_pth, caplog):
    path, reference = r18_pth
    with caplog.at_level(logging.WARNING, logger="facesiam.model"):
        model = build_model(ModelConfig(backbone="iresnet18", head="face", embedding_dim=128, image_size=112,
                                        pretrained=str(path)))
    assert "trunk only" in caplog.text
    torch.testing.assert_close(model.trunk.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert model.head[3].weight.shape == (128, 512 * 7 * 7)


def test_ddp_prefixed_files_load_too(r18_pth, tmp_path):
    path, reference = r18_pth
    wrapped = tmp_path / "ddp.pth"
    torch.save({"module." + k: v for k, v in reference.state_dict().items()}, wrapped)
    model = build_model(ModelConfig(backbone="iresnet18", head="face", image_size=112, pretrained=str(wrapped)))
    torch.testing.assert_close(model.trunk.conv1.weight, reference.conv1.weight)


def test_export_and_reload_and_a_facesiam_state_dict_as_pretrained(r18_pth, tmp_path):
    cfg = ModelConfig(backbone="iresnet18", head="face", image_size=112, pretrained=str(r18_pth[0]))
    model = build_model(cfg).eval()
    export = export_model(model, cfg, tmp_path / "best")
    loaded, loaded_cfg = load_exported(export)
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(loaded(images), expected)
        # the export directory and its weights file as --pretrained
        for source in (export, export / "model.safetensors"):
            again = build_model(ModelConfig(backbone="iresnet18", head="face", image_size=112,
                                            pretrained=str(source))).eval()
            torch.testing.assert_close(again(images), expected)
    assert loaded_cfg.backbone == "iresnet18"
