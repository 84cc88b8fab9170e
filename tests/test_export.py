"""ONNX export (facesiam/export.py) and onnxruntime inference (facesiam/onnx_runtime.py): parity with torch on the
same image files, metadata, no torch on the onnxruntime path, one-line errors.

Real faces: LFW (Huang et al., UMass TR 07-49, 2007) from ../shared/data when present.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from facesiam.commands import main as facesiam_main
from facesiam.config import ModelConfig
from facesiam.eval.embed import embed_images
from facesiam.model import build_model, export_model

from .conftest import run_python, shared_dataset

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from facesiam.onnx_runtime import OnnxEmbedder  # noqa: E402


@pytest.fixture(scope="module")
def cropped_model(tmp_path_factory) -> Path:
    """A random tiny model with a centre crop (the path through every preprocessing stage), face head, 64 px."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_efficientnet", embedding_dim=32, image_size=64, head="face", center_crop=0.8,
                      mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    model = build_model(cfg)
    with torch.no_grad():  # non-trivial BN statistics, so that a wrong eval-mode export would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return export_model(model, cfg, tmp_path_factory.mktemp("run") / "best")


@pytest.fixture(scope="module")
def onnx_file(cropped_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    summary = facesiam_main(["export", str(cropped_model), "--onnx", str(out)])
    assert summary["min_cosine"] > 0.9999
    return out


def _images(face_folder: Path) -> list[str]:
    return sorted(str(p) for p in face_folder.rglob("*.png"))


def test_onnx_embeddings_equal_torch_on_the_same_files(onnx_file, cropped_model, face_folder):
    images = _images(face_folder)
    ref = embed_images(cropped_model, images, device="cpu")
    got = OnnxEmbedder(onnx_file).embed(images, batch_size=7)  # batches of another size: dynamic batch
    assert got.shape == ref.shape == (40, 32)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(ref * got, axis=1)) >= 0.9999
    flipped = OnnxEmbedder(onnx_file).embed(images[:5], flip=True)
    ref_flipped = embed_images(cropped_model, images[:5], device="cpu", flip=True)
    assert np.min(np.sum(ref_flipped * flipped, axis=1)) >= 0.9999
    # the synthetic faces are nearly symmetric, so flipping moves embeddings a little -- but more than the gap
    assert np.abs(flipped - ref_flipped).max() < np.abs(flipped - got[:5]).max() / 3


def test_metadata_describes_the_preprocessing(onnx_file, cropped_model):
    meta = OnnxEmbedder(onnx_file).meta
    cfg = json.loads((cropped_model / "config.json").read_text())
    assert (meta["image_size"], meta["embedding_dim"], meta["center_crop"]) == (64, 32, 0.8)
    assert meta["mean"] == cfg["mean"] and meta["std"] == cfg["std"] and meta["alignment"] is None
    import onnx

    proto = onnx.load(str(onnx_file))
    assert proto.opset_import[0].version >= 17
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # symbolic: any batch size


def test_compare_on_onnx_matches_torch_and_imports_no_torch(onnx_file, cropped_model, face_folder):
    a, b = _images(face_folder)[:2]
    script = ("import json, sys; from facesiam.commands import main; "
              f"r = main(['compare', '--onnx', {str(onnx_file)!r}, {a!r}, {b!r}, '--threshold', '0.5', '--json']); "
              "print('TORCH', 'torch' in sys.modules)")
    out = run_python(["-c", script]).stdout
    result = json.loads(out[: out.rindex("}") + 1])
    assert out.strip().endswith("TORCH False")
    ref = facesiam_main(["compare", "--checkpoint", str(cropped_model), a, b, "--threshold", "0.5", "--json"])
    assert result["similarity"] == pytest.approx(ref["similarity"], abs=1e-4)
    assert result["same"] == (result["similarity"] >= 0.5)


def test_export_refuses_to_overwrite_and_a_network_that_does_not_export_names_its_backbone(
        cropped_model, onnx_file, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=r"model.onnx exists: pass --overwrite"):
        facesiam_main(["export", str(cropped_model), "--onnx", str(onnx_file)])

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::weird_op\nmore lines of exporter output")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    with pytest.raises(SystemExit) as info:
        facesiam_main(["export", str(cropped_model), "--onnx", str(tmp_path / "x.onnx")])
    message = str(info.value)
    assert "'test_efficientnet' does not export to ONNX (unsupported operator aten::weird_op)" in message
    assert "\n" not in message and not (tmp_path / "x.onnx").exists()


def test_bad_onnx_files_are_one_line_errors(tmp_path, face_folder):
    image = _images(face_folder)[0]
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    for path, expected in ((broken, "not a readable ONNX model"), (tmp_path / "absent.onnx", "no such ONNX file")):
        with pytest.raises(SystemExit, match=expected) as info:
            facesiam_main(["compare", "--onnx", str(path), image, image])
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_lfw_faces_embed_the_same_on_onnxruntime(onnx_file, cropped_model):
    lfw = shared_dataset("lfw-devtrain")
    images = sorted(str(p) for p in lfw.rglob("*.jpg"))[:24]
    ref = embed_images(cropped_model, images, device="cpu")
    got = OnnxEmbedder(onnx_file, threads=2).embed(images)
    assert np.min(np.sum(ref * got, axis=1)) >= 0.9999


def test_embed_and_gallery_run_on_onnx_like_the_checkpoint(onnx_file, cropped_model, face_folder, tmp_path):
    from facesiam.eval.embed import load_embeddings

    facesiam_main(["embed", "--checkpoint", str(cropped_model), "--data", str(face_folder), "--out",
                   str(tmp_path / "torch.npz"), "--num-workers", "0"])
    facesiam_main(["embed", "--onnx", str(onnx_file), "--data", str(face_folder), "--out", str(tmp_path / "ort.npz"),
                   "--batch-size", "7"])
    t, o = load_embeddings(tmp_path / "torch.npz"), load_embeddings(tmp_path / "ort.npz")
    assert o["paths"] == t["paths"] and (o["labels"] == t["labels"]).all()
    assert np.min(np.sum(o["embeddings"] * t["embeddings"], axis=1)) >= 0.9999
    assert o["meta"]["runtime"] == "onnxruntime"

    facesiam_main(["gallery", "build", "--onnx", str(onnx_file), "--data", str(face_folder), "--out",
                   str(tmp_path / "g")])
    probe = str(face_folder / t["paths"][5])
    out = tmp_path / "hits.json"
    facesiam_main(["gallery", "search", "--index", str(tmp_path / "g"), "--onnx", str(onnx_file), "--image", probe,
                   "-k", "3", "--out", str(out)])
    hits = json.loads(out.read_text())
    top = hits["results"][0]["matches"][0]
    assert top["identity"] == t["classes"][t["labels"][5]] and top["score"] == pytest.approx(1.0, abs=1e-4)
