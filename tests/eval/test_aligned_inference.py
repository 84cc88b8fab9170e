"""Faces aligned in training are aligned the same way at inference: make_shards --align records the alignment,
training exports it in config.json, and embed / evaluate --data / compare / gallery align raw photos with it.

Real faces: the astronaut photo shipped with scikit-image (Eileen Collins, NASA, public domain).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


from facesiam.commands import main as facesiam_main
from facesiam.faces.aligner import FaceAligner, alignment_info
from facesiam.faces import detectors
from facesiam.faces.detectors import MTCNN_INSTALL_HINT
from facesiam.faces.folder import align_folder
from facesiam.data.format import read_metadata
from facesiam.eval.embed import embed_images, embed_path
from facesiam.model import exported_alignment
from tests.conftest import photo

pytest.importorskip("facenet_pytorch", reason=f"face detection needs: {MTCNN_INSTALL_HINT}")

@pytest.fixture(scope="module")
def raw_photos(tmp_path_factory) -> Path:
    """4 'people' (the same face on differently tinted canvases) x 4 raw photos each, plus one without a face."""
    src = tmp_path_factory.mktemp("raw") / "photos"
    tints = [(128, 128, 128), (90, 120, 160), (160, 120, 90), (110, 150, 110)]
    poses = [(0.8, 0, (60, 60)), (0.6, 12, (150, 40)), (1.0, -8, (40, 90)), (0.7, 5, (120, 140))]
    for person, tint in enumerate(tints):
        (src / f"person{person}").mkdir(parents=True)
        for k, (scale, degrees, offset) in enumerate(poses):
            photo(scale, degrees, offset, tint).save(src / f"person{person}" / f"{k}.jpg", quality=95)
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), np.uint8)
    Image.fromarray(noise).save(src / "person0" / "noise.png")
    return src


def test_make_shards_align_records_the_alignment_and_every_image(raw_photos, tmp_path, capsys):
    dst = tmp_path / "shards"
    meta = facesiam_main(["make-shards", str(raw_photos), str(dst), "--align", "--workers", "1", "--no-progress"])
    assert meta == read_metadata(dst)
    a = meta["alignment"]
    assert a["info"] == alignment_info(FaceAligner())  # detector, template, size
    assert a["source"] == str(raw_photos.resolve()) == meta["source"]
    assert a["counts"]["images"] == 17 and a["counts"]["aligned"] == 16 and a["counts"]["skipped_no_face"] == 1
    by_path = {r["path"]: r for r in a["images"]}
    assert by_path["person0/noise.png"]["status"] == "skipped" and by_path["person0/noise.png"]["reason"]
    assert len(by_path["person2/1.jpg"]["landmarks"]) == 5 and by_path["person2/1.jpg"]["faces"] == 1
    assert meta["num_samples"] == 16 and meta["num_classes"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # the temporary aligned folder is gone
    from facesiam.data import ShardDataset

    image, _ = ShardDataset(dst, "train")[0]
    assert image.size == (112, 112)
    assert "aligned 16 of 17 photos" in capsys.readouterr().err


def test_make_shards_align_refuses_center_crop_in_one_line(raw_photos, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        facesiam_main(["make-shards", str(raw_photos), str(tmp_path / "s"), "--align", "--center-crop", "0.6"])
    assert "--center-crop cannot go with --align" in str(exit_.value.code) and "\n" not in str(exit_.value.code)


def test_training_on_aligned_shards_exports_the_alignment(raw_photos, tmp_path, synthetic_shards, tiny_model_dir):
    from facesiam.commands.train import main as train

    faces = tmp_path / "faces"
    align_folder(raw_photos, faces, workers=1)
    shards = tmp_path / "shards"
    # align_faces then make_shards: the command reads the folder's alignment.json and records it the same
    facesiam_main(["make-shards", str(faces), str(shards), "--workers", "1", "--no-progress"])
    assert read_metadata(shards)["alignment"]["info"] == alignment_info(FaceAligner())
    train(["--data", str(shards), "--output", str(tmp_path / "run"), "--backbone", "test_efficientnet",
           "--embedding-dim", "16", "--image-size", "32", "--batch-size", "8", "--m-per-class", "4",
           "--max-steps", "1", "--num-workers", "0", "--wandb", "off", "--tensorboard", "false",
           "--val-split", "none"])
    for export in ("best", "final"):
        config = json.loads((tmp_path / "run" / export / "config.json").read_text())
        assert config["alignment"] == alignment_info(FaceAligner())
        assert exported_alignment(tmp_path / "run" / export) == config["alignment"]
    assert exported_alignment(tiny_model_dir) is None  # trained on unaligned data: nothing recorded


def test_a_raw_photo_embeds_like_its_aligned_crop(aligned_model, raw_photos, tmp_path):
    raw = raw_photos / "person1" / "1.jpg"
    crop = FaceAligner().align(Image.open(raw).convert("RGB")).image
    crop.save(tmp_path / "crop.png")
    e_raw, e_crop = embed_images(aligned_model, [raw, tmp_path / "crop.png"], device="cpu")
    e_crop_as_is = embed_images(aligned_model, [tmp_path / "crop.png"], device="cpu", align=False)[0]
    assert float(e_raw @ e_crop_as_is) > 0.99
    # without --no-align the crop itself is detected and aligned again: the face is found, the result close
    assert float(e_crop @ e_crop_as_is) > 0.9
    # and the alignment matters: the raw photo fed as it is gives another embedding
    e_raw_as_is = embed_images(aligned_model, [raw], device="cpu", align=False)[0]
    assert float(e_raw @ e_raw_as_is) < float(e_raw @ e_crop_as_is)


def test_a_photo_without_a_face_is_a_one_line_error_naming_it(aligned_model, raw_photos, capsys):
    noise = raw_photos / "person0" / "noise.png"
    with pytest.raises(SystemExit) as exit_:
        facesiam_main(["compare", str(raw_photos / "person0" / "0.jpg"), str(noise), "--checkpoint",
                       str(aligned_model), "--device", "cpu"])
    message = str(exit_.value.code)
    assert message.startswith("compare: ") and str(noise) in message and "--no-align" in message
    assert "\n" not in message
    # with --no-align the same images are compared as they are
    result = facesiam_main(["compare", str(raw_photos / "person0" / "0.jpg"), str(noise), "--checkpoint",
                            str(aligned_model), "--device", "cpu", "--no-align", "--json"])
    want = _direct_embeddings(aligned_model, [Image.open(raw_photos / "person0" / "0.jpg"), Image.open(noise)])
    assert result["similarity"] == pytest.approx(float(want[0] @ want[1]), abs=1e-5)
    # with alignment (the default), two photos with faces score as their aligned crops do
    a, b = raw_photos / "person1" / "0.jpg", raw_photos / "person2" / "1.jpg"
    result = facesiam_main(["compare", str(a), str(b), "--checkpoint", str(aligned_model), "--device", "cpu",
                            "--json"])
    crops = [FaceAligner().align(Image.open(p).convert("RGB")).image for p in (a, b)]
    want = _direct_embeddings(aligned_model, crops)
    assert result["similarity"] == pytest.approx(float(want[0] @ want[1]), abs=1e-4)


def _direct_embeddings(model_dir: Path, pictures: list) -> np.ndarray:
    """Unit embeddings of PIL images through the exported network and its eval transform, nothing else."""
    import torch

    from facesiam.model import eval_transform_for, load_exported

    model, cfg = load_exported(model_dir)
    t = eval_transform_for(cfg)
    with torch.no_grad():
        e = model(torch.stack([t(p.convert("RGB")) for p in pictures])).numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_embed_aligns_raw_data_on_the_fly_and_reads_aligned_data_as_is(aligned_model, raw_photos, tmp_path, caplog):
    faces = tmp_path / "faces"
    align_folder(raw_photos, faces, workers=1)
    caplog.set_level("INFO")
    on_the_fly = embed_path(aligned_model, raw_photos, device="cpu", progress=True)
    assert on_the_fly["meta"]["alignment"].startswith("on the fly")
    assert "person0/noise.png: no face found; using a centre crop" in caplog.text  # kept, with a warning
    recorded = embed_path(aligned_model, faces, device="cpu")
    assert recorded["meta"]["alignment"] == "recorded in the data"
    raw_rows = {p: i for i, p in enumerate(on_the_fly["paths"])}
    for j, path in enumerate(recorded["paths"]):  # person1/1.png <- person1/1.jpg
        i = raw_rows[path[: -len(".png")] + ".jpg"]
        assert float(on_the_fly["embeddings"][i] @ recorded["embeddings"][j]) > 0.99, path
    as_is = embed_path(aligned_model, raw_photos, device="cpu", align=False)
    assert as_is["meta"]["alignment"] == "off"


def test_evaluate_and_gallery_take_no_align(aligned_model, raw_photos, tmp_path):
    report = facesiam_main(["evaluate", "--checkpoint", str(aligned_model), "--data", str(raw_photos),
                            "--out", str(tmp_path / "report"), "--device", "cpu", "--num-workers", "0"])
    assert report["source"]["alignment"].startswith("on the fly")
    facesiam_main(["gallery", "build", "--checkpoint", str(aligned_model), "--data", str(raw_photos),
                   "--out", str(tmp_path / "gallery"), "--device", "cpu", "--num-workers", "0"])
    assert json.loads((tmp_path / "gallery" / "gallery.json").read_text())["alignment"].startswith("on the fly")
    facesiam_main(["gallery", "search", "--index", str(tmp_path / "gallery"), "--checkpoint", str(aligned_model),
                   "--image", str(raw_photos / "person2" / "0.jpg"), "-k", "4", "--device", "cpu",
                   "--out", str(tmp_path / "found.json")])
    matches = json.loads((tmp_path / "found.json").read_text())["results"][0]["matches"]
    # the same photo is in the gallery: aligned the same way on both paths, it scores 1 (a random model may score
    # the other tints of this one face as high, so the check is on the entry, not on the rank)
    mine = [m for m in matches if m["path"] == "person2/0.jpg"]
    assert mine and mine[0]["score"] > 0.999


def test_a_model_trained_unaligned_never_runs_the_detector(tiny_model_dir, raw_photos, monkeypatch):
    def no_detector(*args, **kwargs):
        raise AssertionError("the detector ran for a model trained on unaligned images")

    monkeypatch.setattr(detectors, "load_mtcnn", no_detector)
    embed_images(tiny_model_dir, [raw_photos / "person0" / "0.jpg"], device="cpu")
    assert embed_path(tiny_model_dir, raw_photos, device="cpu")["meta"]["alignment"].startswith("none")
