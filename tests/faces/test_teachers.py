"""Face-embedding teachers for distillation (facesiam.faces.teachers): dlib's own pipeline and its landmark
fallback, ONNX embedders (a facesiam export and foreign files), one-line errors.

Real face: the astronaut photo shipped with scikit-image (Eileen Collins, NASA, public domain).
"""

from __future__ import annotations

import pickle
import builtins
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageOps

from facesiam.errors import InputError
from facesiam.faces import teachers as teachers_module
from facesiam.faces.teachers import (DLIB_INSTALL_HINT, TEACHER_ALIGN_CHOICES, TEACHERS, Prepared, build_teacher,
                                     load_dlib)
from facesiam.faces.template import estimate_transform, warp

# Measured cosine of the landmark fallback to dlib's own embedding: 0.993 on this photo, mean 0.995 / min 0.975
# on 100 LFW photos (see DLIB_CHIP_LANDMARKS); the bar leaves room for other dlib and MTCNN builds.
LANDMARK_PATH_MIN_COSINE = 0.98


def _unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(1, -1) if np.ndim(x) == 1 else np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())


@pytest.fixture(scope="module")
def astronaut_landmarks(astronaut) -> np.ndarray:
    """Her 5 landmarks from facesiam's MTCNN (what the alignment record would hold)."""
    pytest.importorskip("facenet_pytorch", reason="MTCNN needs facenet-pytorch")
    from facesiam.faces.detectors import build_detector

    faces = build_detector("mtcnn").detect_batch([astronaut])[0]
    assert len(faces) == 1
    return faces[0].landmarks


@pytest.fixture(scope="module")
def dlib_teacher():
    pytest.importorskip("dlib", reason="teacher dlib needs dlib: pip install 'facesiam[teacher-dlib]'")
    try:
        return build_teacher("dlib")
    except InputError as err:
        pytest.skip(str(err))


# ------------------------------------------------------------------------------------------ dlib

def test_dlib_teacher_equals_dlibs_own_api(dlib_teacher, astronaut):
    import dlib

    _, files = load_dlib()
    pixels = np.asarray(astronaut)
    boxes = dlib.get_frontal_face_detector()(pixels, 1)
    box = max(boxes, key=lambda r: r.area())  # her face (dlib also finds a second, false one on her suit)
    shape = dlib.shape_predictor(str(files["shape_predictor"]))(pixels, box)
    ref = _unit(dlib.face_recognition_model_v1(str(files["descriptor"])).compute_face_descriptor(pixels, shape))

    prepared = dlib_teacher.prepare(astronaut)
    assert prepared.found_by == "teacher" and prepared.input.shape == (150, 150, 3)
    got = dlib_teacher.embed([prepared.input, prepared.input])
    assert got.shape == (2, 128) and got.dtype == np.float32 and dlib_teacher.dim == 128
    np.testing.assert_allclose(got, np.repeat(ref, 2, axis=0), atol=1e-4)
    assert dlib_teacher.embed([]).shape == (0, 128)
    fp = dlib_teacher.fingerprint()
    assert fp["name"] == "dlib" and fp["dlib"] == dlib.__version__ and len(fp["descriptor_sha256"]) == 64
    assert fp["chip_size"] == 150 and fp["chip_padding"] == 0.25 and fp["fallback"]

    # pickled as how to build it again (the teacher pass's helper processes): the same teacher on the other side
    again = pickle.loads(pickle.dumps(dlib_teacher))
    assert again.fingerprint() == fp
    np.testing.assert_array_equal(again.embed([prepared.input]), got[:1])


def test_dlib_landmark_fallback_matches_dlibs_own_embedding(dlib_teacher, astronaut, astronaut_landmarks,
                                                            monkeypatch):
    own = dlib_teacher.prepare(astronaut, astronaut_landmarks)
    assert own.found_by == "teacher"  # the landmarks pick the detection nearest them: her face again
    np.testing.assert_array_equal(own.input, dlib_teacher.prepare(astronaut).input)

    monkeypatch.setattr(dlib_teacher, "detector", lambda pixels, upsample: [])  # dlib's detector misses
    fallback = dlib_teacher.prepare(astronaut, astronaut_landmarks)
    assert fallback.found_by == "landmarks" and fallback.input.shape == (150, 150, 3)
    a, b = dlib_teacher.embed([own.input, fallback.input])
    assert float(a @ b) >= LANDMARK_PATH_MIN_COSINE
    assert dlib_teacher.prepare(astronaut) == Prepared(None, "none")
    with pytest.raises(InputError, match="landmarks must be 5x2"):
        dlib_teacher.prepare(astronaut, np.zeros((4, 2)))


def test_missing_dlib_is_a_one_line_error(monkeypatch):
    real_import = builtins.__import__

    def no_dlib(name, *args, **kwargs):
        if name == "dlib":
            raise ImportError("No module named 'dlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dlib)
    with pytest.raises(InputError) as err:
        build_teacher("dlib")
    assert str(err.value) == DLIB_INSTALL_HINT and "\n" not in str(err.value)


def test_missing_dlib_weights_are_the_same_error(monkeypatch):
    pytest.importorskip("dlib")
    find_spec = teachers_module.importlib.util.find_spec
    monkeypatch.setattr(teachers_module.importlib.util, "find_spec",  # dlib, but not the weights package
                        lambda name, *a: None if name == "face_recognition_models" else find_spec(name, *a))
    with pytest.raises(InputError) as err:
        build_teacher("dlib")
    assert str(err.value) == DLIB_INSTALL_HINT


def test_unknown_spec_lists_the_choices():
    for spec in ("arcface", "onnx:", "dlib:x", ""):
        with pytest.raises(InputError, match=r"unknown teacher .*; choose one of dlib, onnx:PATH$"):
            build_teacher(spec)
    assert TEACHERS.names() == ("dlib", "onnx") and TEACHER_ALIGN_CHOICES == ("arcface112", "none")
    with pytest.raises(InputError, match="drop --teacher-size"):
        build_teacher("dlib", size=112)


# ------------------------------------------------------------------------------------------ ONNX

@pytest.fixture(scope="module")
def aligned_onnx(aligned_model, tmp_path_factory) -> Path:
    """The tiny aligned model (ArcFace 112 px alignment, 64 px input) exported to ONNX with facesiam metadata."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from facesiam.export import export_onnx

    out = tmp_path_factory.mktemp("teacher") / "model.onnx"
    export_onnx(aligned_model, out, check=False)
    return out


def _torch_embedding(model_dir: Path, image: Image.Image) -> np.ndarray:
    import torch

    from facesiam.model import eval_transform_for, load_exported

    model, cfg = load_exported(model_dir, device="cpu")
    with torch.inference_mode():
        return _unit(model(eval_transform_for(cfg)(image)[None]).numpy())


def test_onnx_teacher_from_a_facesiam_export_equals_torch(aligned_onnx, aligned_model, astronaut,
                                                         astronaut_landmarks):
    teacher = build_teacher(f"onnx:{aligned_onnx}", threads=1)
    assert teacher.name == f"onnx:{aligned_onnx.resolve()}" and teacher.dim == 32
    assert (teacher.size, teacher.align, teacher.config["align_size"]) == (64, "arcface112", 112)
    prepared = teacher.prepare(astronaut, astronaut_landmarks)
    assert prepared.found_by == "landmarks" and prepared.input.shape == (3, 64, 64)
    crop = warp(astronaut, estimate_transform(astronaut_landmarks, 112), 112)  # as the training faces were
    ref = _torch_embedding(aligned_model, crop)
    got = teacher.embed([prepared.input] * 3)
    assert got.shape == (3, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, np.repeat(ref, 3, axis=0), atol=1e-4)
    detected = teacher.prepare(astronaut)  # no landmarks: facesiam's MTCNN finds the same points
    assert detected.found_by == "teacher"
    np.testing.assert_allclose(detected.input, prepared.input, atol=1e-6)
    blank = teacher.prepare(Image.new("RGB", (200, 200), (90, 90, 90)))
    assert blank == Prepared(None, "none")
    fp = teacher.fingerprint()
    assert fp["path"] == str(aligned_onnx.resolve()) and len(fp["sha256"]) == 64
    assert (fp["size"], fp["align"], fp["mean"], fp["std"]) == (64, "arcface112", teacher.config["mean"],
                                                                teacher.config["std"])


def _without_metadata(src: Path, dst: Path) -> Path:
    import onnx

    proto = onnx.load(str(src))
    del proto.metadata_props[:]
    onnx.save(proto, str(dst))
    return dst


def test_onnx_teacher_without_metadata_needs_the_preprocessing(aligned_onnx, aligned_model, astronaut, tmp_path):
    import json

    plain = _without_metadata(aligned_onnx, tmp_path / "plain.onnx")
    with pytest.raises(InputError) as err:
        build_teacher(f"onnx:{plain}")
    assert "no facesiam metadata" in str(err.value) and "\n" not in str(err.value)
    for flag in ("--teacher-size", "--teacher-mean", "--teacher-std", "--teacher-align"):
        assert flag in str(err.value)
    cfg = json.loads((aligned_model / "config.json").read_text())
    cfg = cfg.get("model", cfg)
    with pytest.raises(InputError, match="fixed at 64x64 pixels, not 112; pass --teacher-size 64"):
        build_teacher(f"onnx:{plain}", size=112, mean=cfg["mean"], std=cfg["std"], align="none")
    with pytest.raises(InputError, match="--teacher-align must be one of arcface112, none"):
        build_teacher(f"onnx:{plain}", size=64, mean=cfg["mean"], std=cfg["std"], align="tilted")

    teacher = build_teacher(f"onnx:{plain}", size=64, mean=cfg["mean"], std=cfg["std"], align="none")
    prepared = teacher.prepare(astronaut)  # the whole photo, resized
    assert prepared.found_by == "teacher" and prepared.input.shape == (3, 64, 64)
    np.testing.assert_allclose(teacher.embed([prepared.input]), _torch_embedding(aligned_model, astronaut), atol=1e-4)
    # pickled as how to build it again, its given preprocessing included (a plain name would not rebuild it)
    again = pickle.loads(pickle.dumps(teacher))
    assert again.fingerprint() == teacher.fingerprint() and again.config == teacher.config
    np.testing.assert_array_equal(again.embed([again.prepare(astronaut).input]), teacher.embed([prepared.input]))
    with pytest.raises(InputError, match="drop --teacher-size 112"):
        build_teacher(f"onnx:{aligned_onnx}", size=112)


def _tiny_onnx(path: Path, input_shape: list, output: str = "mean") -> Path:
    """A hand-built ONNX 'embedder': per-channel means of the image (N, 3), or the image itself (rank 4)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)
    if output == "mean":
        node = helper.make_node("ReduceMean", ["x"], ["y"], axes=list(range(2, len(input_shape))), keepdims=0)
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "D"])
    else:
        node = helper.make_node("Identity", ["x"], ["y"])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, input_shape)
    model = helper.make_model(helper.make_graph([node], "tiny", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_onnx_teacher_errors_are_one_line(tmp_path, astronaut):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    settings = {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "align": "none"}
    good = build_teacher(f"onnx:{_tiny_onnx(tmp_path / 'mean.onnx', ['N', 3, 32, 32])}", **settings)
    assert good.dim == 3 and good.embed([good.prepare(astronaut).input]).shape == (1, 3)
    with pytest.raises(InputError, match=r"embeds \(3, 32, 32\) inputs"):
        good.embed([np.zeros((3, 16, 16), np.float32)])
    cases = [(_tiny_onnx(tmp_path / "rank3.onnx", ["N", 32, 32]), r"takes one float32 image batch \(N, 3, H, W\)"),
             (_tiny_onnx(tmp_path / "fixed.onnx", ["N", 3, 48, 48]), "fixed at 48x48 pixels, not 32"),
             (_tiny_onnx(tmp_path / "rank4.onnx", ["N", 3, 32, 32], output="same"), r"must output one embedding"),
             (tmp_path / "absent.onnx", "no such ONNX file")]
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not an ONNX model")
    cases.append((broken, "not a readable ONNX model"))
    for path, expected in cases:
        # a missing file is a FileNotFoundError (commands turn both into one line, exit 1), the rest InputError
        with pytest.raises(FileNotFoundError if "no such" in expected else InputError, match=expected) as err:
            build_teacher(f"onnx:{path}", **settings)
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ the mirror image

def test_a_mirrored_dlib_teacher_sums_the_face_and_its_mirror_image(dlib_teacher, astronaut):
    mirrored = build_teacher("dlib", mirror=True)
    prepared = mirrored.prepare(astronaut)
    np.testing.assert_array_equal(prepared.input, dlib_teacher.prepare(astronaut).input)  # one detection, the same
    flipped = np.asarray(ImageOps.mirror(Image.fromarray(prepared.input)))  # the chip mirrored by PIL
    plain, mirror = dlib_teacher.embed([prepared.input, flipped])
    assert float(plain @ mirror) < 0.9999  # dlib's descriptor is not mirror-symmetric: the sum is a new target
    got = mirrored.embed([prepared.input])
    np.testing.assert_allclose(got, _unit(plain + mirror), atol=1e-5)
    assert (mirrored.name, mirrored.dim) == ("dlib", 128)
    # its own cache: the fingerprint says mirror; pickled (helper processes) it is the same teacher
    assert mirrored.fingerprint() == {**dlib_teacher.fingerprint(), "mirror": True}
    again = pickle.loads(pickle.dumps(mirrored))
    np.testing.assert_array_equal(again.embed([prepared.input]), got)
    assert mirrored.same_person_threshold == dlib_teacher.same_person_threshold


def test_a_mirrored_onnx_teacher_sums_the_face_and_its_mirror_image(aligned_onnx, aligned_model, astronaut,
                                                                   astronaut_landmarks):
    teacher = build_teacher(f"onnx:{aligned_onnx}", threads=1, mirror=True)
    prepared = teacher.prepare(astronaut, astronaut_landmarks)
    crop = warp(astronaut, estimate_transform(astronaut_landmarks, 112), 112)
    want = _unit(_torch_embedding(aligned_model, crop) + _torch_embedding(aligned_model, ImageOps.mirror(crop)))
    np.testing.assert_allclose(teacher.embed([prepared.input]), want, atol=1e-4)
    assert teacher.fingerprint()["mirror"] is True
