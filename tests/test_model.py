"""The embedding model: normalised output, export/reload, and pretrained weights from hub or file failing clearly."""

import json

import pytest
import torch
from safetensors.torch import save_file

from facesiam.config import ModelConfig
from facesiam.model import PretrainedWeightsError, build_model, export_model, load_exported, read_exported_config

TINY = dict(backbone="test_efficientnet", embedding_dim=16, image_size=32)


@pytest.mark.parametrize("head", ["linear", "face"])
def test_embeddings_are_unit_length_and_reload_identically(tmp_path, head):
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, head=head, center_crop=0.6, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    model = build_model(cfg).eval()
    x = torch.randn(3, 3, 32, 32)
    emb = model(x)
    assert emb.shape == (3, 16) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    export_model(model, cfg, tmp_path / "best", extra={"step": 7})
    again, cfg2 = load_exported(tmp_path)  # a run directory resolves to its best/
    assert cfg2 == ModelConfig(**{**cfg.__dict__, "pretrained": "none"})
    assert torch.equal(again(x), emb)
    meta = json.loads((tmp_path / "best" / "config.json").read_text())
    assert meta["export_info"]["step"] == 7 and meta["center_crop"] == 0.6
    assert read_exported_config(tmp_path / "best").mean == (0.5, 0.5, 0.5)


def test_export_replaces_old_export_only_when_complete(tmp_path, monkeypatch):
    cfg = ModelConfig(**TINY)
    export_model(build_model(cfg), cfg, tmp_path / "best")
    before = (tmp_path / "best" / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_model(build_model(cfg), cfg, tmp_path / "best")
    assert (tmp_path / "best" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"], "no temporary directory left behind"


def test_local_pretrained_file_loads_into_the_trunk(tmp_path):
    torch.manual_seed(1)
    source = build_model(ModelConfig(**TINY))
    save_file({k: v.contiguous() for k, v in source.trunk.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(source.trunk.state_dict(), tmp_path / "w.pth")
    for path in ("w.safetensors", "w.pth"):
        torch.manual_seed(2)
        model = build_model(ModelConfig(**TINY, pretrained=str(tmp_path / path)))
        for k, v in source.trunk.state_dict().items():
            assert torch.equal(model.trunk.state_dict()[k], v), k


def test_pretrained_errors_are_clear(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="not found"):
        build_model(ModelConfig(**TINY, pretrained=str(tmp_path / "missing.pth")))
    other = build_model(ModelConfig(backbone="test_resnet", embedding_dim=8, image_size=32))
    torch.save(other.trunk.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(PretrainedWeightsError, match="does not fit this backbone"):
        build_model(ModelConfig(**TINY, pretrained=str(tmp_path / "resnet.pth")))


def test_unreachable_hub_names_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what a machine without the hub sees, without waiting for time-outs
    with pytest.raises(PretrainedWeightsError, match="--pretrained none.*--pretrained PATH"):
        build_model(ModelConfig(**TINY, pretrained="hub"))


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model(ModelConfig(backbone="no_such_net"))


def test_batch_statistics_normalise_like_training_and_restore_the_model():
    import copy

    from facesiam.model import batch_statistics

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="test_efficientnet", embedding_dim=16, image_size=32, head="face",
                                    dropout=0.5))
    images = torch.randn(8, 3, 32, 32) * 2 + 0.5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Independently: train mode without dropout, on a copy whose running statistics may drift.
    reference = copy.deepcopy(model).train()
    reference.head[1].p = 0.0
    with torch.no_grad():
        expected, eval_mode = reference(images), copy.deepcopy(model).eval()(images)
    model.train()
    with batch_statistics(model), torch.no_grad():
        got = model(images)
        assert not model.head[1].training and model.head[0].training  # dropout off, BatchNorm on batch statistics
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, eval_mode, atol=1e-3)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


# ------------------------------------------------------------------------------------------------ --pretrained RUN/best

def _export(tmp_path, name: str, **model) -> tuple:
    from facesiam.config import ModelConfig
    from facesiam.model import build_model, export_model

    torch.manual_seed(len(name))
    cfg = ModelConfig(**{"backbone": "test_efficientnet", "embedding_dim": 16, "image_size": 32, **model})
    net = build_model(cfg)
    return net, export_model(net, cfg, tmp_path / name / "best")


def test_pretrained_from_a_facesiam_export_loads_trunk_and_head(tmp_path):
    from facesiam.config import ModelConfig
    from facesiam.model import build_model

    source, path = _export(tmp_path, "student")
    model = build_model(ModelConfig(backbone="test_efficientnet", embedding_dim=16, image_size=32,
                                    pretrained=str(path.parent)))  # RUN or RUN/best
    for (k, a), (_, b) in zip(source.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k


def test_a_head_of_another_size_is_reinitialised_with_a_warning(tmp_path, caplog):
    from facesiam.config import ModelConfig
    from facesiam.model import build_model

    source, path = _export(tmp_path, "student128", embedding_dim=8)
    torch.manual_seed(123)
    fresh = build_model(ModelConfig(backbone="test_efficientnet", embedding_dim=16, image_size=32))
    torch.manual_seed(123)
    with caplog.at_level("WARNING", logger="facesiam.model"):
        model = build_model(ModelConfig(backbone="test_efficientnet", embedding_dim=16, image_size=32,
                                        pretrained=str(path)))
    assert "head is newly initialised" in caplog.text and "8-d" in caplog.text
    for k, v in model.trunk.state_dict().items():
        assert torch.equal(v, source.trunk.state_dict()[k]), k
    for k, v in model.head.state_dict().items():
        assert torch.equal(v, fresh.head.state_dict()[k]), k  # untouched by the checkpoint


def test_pretrained_export_of_another_backbone_is_one_line(tmp_path):
    from facesiam.config import ModelConfig
    from facesiam.model import PretrainedWeightsError, build_model

    _, path = _export(tmp_path, "other")
    with pytest.raises(PretrainedWeightsError, match="set --backbone test_efficientnet") as err:
        build_model(ModelConfig(backbone="resnet18", embedding_dim=16, pretrained=str(path)))
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no exported model"):
        build_model(ModelConfig(backbone="test_efficientnet", pretrained=str(tmp_path / "empty")))
