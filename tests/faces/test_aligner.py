"""Face detection and alignment (facesiam.faces) and its command (facesiam.commands.align_faces).

Real faces: the astronaut photo shipped with scikit-image (Eileen Collins, NASA, public domain), pasted into
canvases at known scales, rotations and offsets with skimage's own warp (an implementation independent of the
one under test), and a few LFW images when ../shared/data is present.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import skimage.data
from skimage.transform import SimilarityTransform
from skimage.transform import warp as skimage_warp

from facesiam.commands import main as facesiam_main
from facesiam.commands.align_faces import main
from facesiam.faces import folder as folder_job
from facesiam.faces.aligner import FaceAligner, alignment_info
from facesiam.faces.detectors import MTCNN_INSTALL_HINT, Face
from facesiam.faces.folder import align_folder
from facesiam.faces.record import ALIGNMENT_FILE
from facesiam.faces.template import ARCFACE_TEMPLATE_112, arcface_template, center_crop, estimate_transform, warp
from facesiam.data.folder import list_image_folder
from facesiam.errors import InputError

from ..conftest import REPO, shared_dataset

FACE_REGION = (130, 10, 320, 230)  # x0, y0, x1, y1 of the astronaut photo: her face with some hair and collar
CANVAS = (480, 480)  # height, width
GREY = 0.5


# ----------------------------------------------------------------------------- helpers

def _face() -> np.ndarray:
    x0, y0, x1, y1 = FACE_REGION
    return skimage.data.astronaut()[y0:y1, x0:x1] / 255.0


def paste(faces, shape=CANVAS, background=None) -> tuple[Image.Image, list[SimilarityTransform]]:
    """A canvas with the astronaut's face once per (scale, degrees, (x, y) centre); the face-crop -> canvas maps."""
    crop = _face()
    h, w = crop.shape[:2]
    out = np.full(shape + (3,), GREY) if background is None else background / 255.0
    maps = []
    for scale, degrees, centre in faces:
        p = (SimilarityTransform(translation=(-(w - 1) / 2, -(h - 1) / 2))
             + SimilarityTransform(scale=scale, rotation=np.radians(degrees)) + SimilarityTransform(translation=centre))
        layer = skimage_warp(crop, p.inverse, output_shape=shape, order=1, cval=-1.0)
        out = np.where(layer >= 0, layer, out)
        maps.append(p)
    return Image.fromarray((out * 255).round().astype(np.uint8)), maps


def correlation(a: Image.Image, b: Image.Image, border: int = 16) -> float:
    """Normalised correlation of two crops' grey levels, without the border (where rotations differ most)."""
    x = np.asarray(a.convert("L"), np.float64)[border:-border, border:-border].ravel()
    y = np.asarray(b.convert("L"), np.float64)[border:-border, border:-border].ravel()
    x, y = x - x.mean(), y - y.mean()
    return float(x @ y / np.sqrt((x @ x) * (y @ y)))


@pytest.fixture(scope="module")
def mtcnn() -> None:
    """Skips a test that runs the detector when facenet-pytorch is not installed (the rest still run)."""
    pytest.importorskip("facenet_pytorch", reason=f"face detection needs: {MTCNN_INSTALL_HINT}")


@pytest.fixture(scope="module")
def aligner(mtcnn) -> FaceAligner:
    return FaceAligner()


@pytest.fixture(scope="module")
def reference(aligner):
    """The upright face at scale 1 in the middle: (result, landmarks in face-crop coordinates)."""
    image, (p,) = paste([(1.0, 0, (240, 240))])
    result = aligner.align(image)
    assert result.status == "aligned" and result.faces == 1
    return result, p.inverse(np.asarray(result.landmarks))


# ----------------------------------------------------------------------------- template and transform

def test_template_scales_with_size_and_info_records_it(aligner):
    assert arcface_template(112) == pytest.approx(ARCFACE_TEMPLATE_112)
    assert arcface_template(224) == pytest.approx(2 * ARCFACE_TEMPLATE_112)
    info = alignment_info(aligner)
    assert info["detector"]["name"] == "MTCNN" and info["detector"]["version"]
    assert np.asarray(info["template"]["points"]) == pytest.approx(ARCFACE_TEMPLATE_112, abs=1e-4)
    assert (info["size"], info["min_face_size"], info["multi"]) == (112, 20, "largest")
    json.dumps(info)  # goes into dataset.json / config.json as is


def test_estimate_transform_inverts_a_known_similarity():
    known = SimilarityTransform(scale=2.7, rotation=np.radians(-23), translation=(310.5, 84.25))
    landmarks = known(ARCFACE_TEMPLATE_112 * 1.5)  # a face at size 168 put into a photo by `known`
    tform = estimate_transform(landmarks, 168)
    assert tform(landmarks) == pytest.approx(arcface_template(168), abs=1e-6)
    assert tform.scale == pytest.approx(1 / 2.7) and np.degrees(tform.rotation) == pytest.approx(23)
    with pytest.raises(InputError, match="no similarity transform"):
        estimate_transform(np.zeros((5, 2)))


def test_warp_uses_pixel_index_coordinates_and_antialiases():
    photo = Image.fromarray(skimage.data.astronaut())
    exact = np.asarray(photo.crop((10, 20, 122, 132)))
    assert np.array_equal(np.asarray(warp(photo, SimilarityTransform(translation=(-10, -20)))), exact)
    # shrinking 4x: pixel i of the crop is the centre (4i + 1.5) of 4 source pixels, as a 4x4 box average is
    shrink = SimilarityTransform(scale=0.25, translation=(-0.375, -0.375))
    diff = np.abs(np.asarray(warp(photo, shrink), float) - np.asarray(photo.reduce(4).crop((0, 0, 112, 112)), float))
    assert diff[2:-2, 2:-2].mean() < 1.0  # plain bilinear sampling (no pre-reduce) is ~8 grey levels off


# ----------------------------------------------------------------------------- geometry on a real face

@pytest.mark.parametrize("scale, degrees, centre, shape", [
    (0.5, 0, (150, 300), CANVAS), (2.0, 0, (240, 240), CANVAS), (1.0, 30, (240, 240), CANVAS),
    (1.0, -30, (260, 220), CANVAS), (0.7, 15, (120, 120), CANVAS), (1.5, -20, (250, 250), CANVAS),
    (0.6, -30, (350, 130), CANVAS),
    (4.0, 20, (500, 480), (960, 1000)),  # a face 4x the crop: the warp box-filters the photo first
])
def test_the_same_face_aligns_the_same_at_any_scale_rotation_and_place(aligner, reference, scale, degrees, centre,
                                                                       shape):
    ref, ref_landmarks = reference
    image, (p,) = paste([(scale, degrees, centre)], shape=shape)
    result = aligner.align(image)
    assert result.status == "aligned" and result.faces == 1 and result.image.size == (112, 112)
    landmarks = np.asarray(result.landmarks)
    # the detector finds the same points as on the reference, moved by the paste (MTCNN's noise: a few px)
    assert np.linalg.norm(p(ref_landmarks) - landmarks, axis=1).max() < 4.5 * max(1.0, scale)
    # mapped through the estimated transform they land on the template up to this face's own shape (her smile
    # is wider than the template's mouth) ...
    tform = estimate_transform(landmarks)
    on_crop = tform(landmarks)
    distance = np.linalg.norm(on_crop - ARCFACE_TEMPLATE_112, axis=1)
    assert distance.mean() < 6.0 and distance.max() < 9.0
    # ... and on the same crop pixels as the reference's landmarks do
    ref_on_crop = estimate_transform(np.asarray(ref.landmarks))(np.asarray(ref.landmarks))
    assert np.linalg.norm(on_crop - ref_on_crop, axis=1).max() < 2.5
    assert correlation(result.image, ref.image) > 0.88


def test_correlation_threshold_tells_a_misaligned_crop(reference):
    ref, _ = reference
    shifted = Image.fromarray(np.roll(np.asarray(ref.image), 8, axis=1))  # the face 8 px off (7 % of the crop)
    assert correlation(shifted, ref.image) < 0.85


def test_exif_orientation_is_applied_before_detection(tmp_path, reference):
    ref, _ = reference
    image, _ = paste([(1.0, 0, (240, 240))])
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the stored pixels are the upright image turned 90 CCW
    path = tmp_path / "sideways.jpg"
    image.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)
    from facesiam.data.images import load_rgb

    result = FaceAligner().align(load_rgb(path))
    assert result.status == "aligned" and correlation(result.image, ref.image) > 0.9


# ----------------------------------------------------------------------------- no face, several faces, small faces

@pytest.mark.parametrize("kind", ["noise", "flat"])
def test_no_face_is_skipped_or_centre_cropped(aligner, kind):
    rng = np.random.default_rng(0)
    if kind == "noise":
        pixels = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    else:
        pixels = np.full((300, 400, 3), 128, np.uint8)
    image = Image.fromarray(pixels)
    result = aligner.align(image)
    assert (result.status, result.image, result.faces, result.skip) == ("skipped", None, 0, "no_face")
    assert "no face" in result.reason
    fallback = FaceAligner(on_no_face="center").align(image)
    assert fallback.status == "center" and fallback.image.size == (112, 112) and "no face" in fallback.reason
    assert np.array_equal(np.asarray(fallback.image), np.asarray(center_crop(image, 112)))


def test_several_faces_largest_or_central(mtcnn):
    image, (big, small) = paste([(1.3, 0, (140, 200)), (0.6, 0, (330, 170))], shape=(360, 480))
    centre = np.array([240, 180])
    results = {multi: FaceAligner(multi=multi).align(image) for multi in ("largest", "central")}
    for result in results.values():
        assert result.status == "aligned" and result.faces == 2 and "2 faces" in result.reason
    box_centre = {m: (np.asarray(r.box[:2]) + np.asarray(r.box[2:])) / 2 for m, r in results.items()}
    assert np.linalg.norm(box_centre["largest"] - big([[94.5, 109.5]])[0]) < 25  # face crop centre -> canvas
    assert np.linalg.norm(box_centre["central"] - small([[94.5, 109.5]])[0]) < 15
    width = {m: r.box[2] - r.box[0] for m, r in results.items()}
    assert width["largest"] > 1.8 * width["central"]
    assert np.linalg.norm(box_centre["central"] - centre) < np.linalg.norm(box_centre["largest"] - centre)


def test_small_cut_off_and_tiny_inputs_are_skipped_with_reasons(aligner):
    photo = Image.new("RGB", (200, 200))
    tmpl = ARCFACE_TEMPLATE_112 / 112
    small = Face(np.array([50, 50, 62, 65.0]), 0.99, 50 + 12 * tmpl)  # 15 px box
    result = aligner.align_faces(photo, [small])
    assert (result.status, result.skip, result.faces) == ("skipped", "too_small", 1)
    assert "15 px < min_face_size 20" in result.reason
    cut = Face(np.array([-60, 40, 40, 160.0]), 0.99, np.array([-60, 40]) + 100 * tmpl)  # left eye off the photo
    result = aligner.align_faces(photo, [cut])
    assert (result.status, result.skip) == ("skipped", "cut_off")
    whole = Face(np.array([100, 40, 180, 140.0]), 0.9, np.array([100, 40]) + 80 * tmpl)
    result = aligner.align_faces(photo, [cut, small, whole])  # the cut one is larger, the whole one is kept
    assert result.status == "aligned" and result.faces == 3 and result.box == [100, 40, 180, 140]
    tiny = aligner.align(Image.new("RGB", (15, 40)))  # MTCNN itself would crash on an empty image pyramid
    assert (tiny.status, tiny.skip) == ("skipped", "too_small") and "15x40" in tiny.reason


def test_batches_with_differing_face_counts_and_sizes(aligner):
    two, _ = paste([(1.3, 0, (140, 200)), (0.6, 0, (330, 170))], shape=(360, 480))
    one, _ = paste([(0.9, 10, (250, 180))], shape=(360, 480))
    other_size, _ = paste([(0.8, 0, (160, 160))], shape=(320, 320))
    none = Image.fromarray(np.full((360, 480, 3), 128, np.uint8))
    # MTCNN returns ragged object arrays here (2, 1, 0 faces), and a regular (2, 1, 4) one for [one, one]
    found = aligner.detect_batch([two, one, none, other_size, one])
    assert [len(f) for f in found] == [2, 1, 0, 1, 1]
    assert [len(f) for f in aligner.detect_batch([one, one])] == [1, 1]
    alone = aligner.detect(one)[0]
    assert found[1][0].landmarks == pytest.approx(alone.landmarks, abs=0.05)
    results = aligner.align_batch([two, one, none, other_size])
    assert [r.status for r in results] == ["aligned", "aligned", "skipped", "aligned"]
    assert [r.faces for r in results] == [2, 1, 0, 1]


def test_options_are_checked():
    for kwargs in ({"multi": "biggest"}, {"on_no_face": "crop"}, {"min_face_size": 5}, {"size": 0}):
        with pytest.raises(InputError):
            FaceAligner(**kwargs)


def test_missing_facenet_pytorch_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # import raises ImportError
    with pytest.raises(InputError) as err:
        FaceAligner()
    assert MTCNN_INSTALL_HINT in str(err.value) and "\n" not in str(err.value)


def test_lfw_faces_align(aligner):
    lfw = shared_dataset("lfw-devtrain")
    people = sorted(p for p in lfw.iterdir() if p.is_dir())[:4]
    paths = [sorted(p.iterdir())[0] for p in people]
    from facesiam.data.images import load_rgb

    results = FaceAligner(multi="central").align_batch([load_rgb(p) for p in paths])
    for path, result in zip(paths, results):
        assert result.status == "aligned", (path, result.reason)
        on_crop = estimate_transform(np.asarray(result.landmarks))(np.asarray(result.landmarks))
        assert np.linalg.norm(on_crop - ARCFACE_TEMPLATE_112, axis=1).max() < 10, path


# ----------------------------------------------------------------------------- whole folders and the command

@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory) -> Path:
    """SRC/<identity>/<image>: faces (one EXIF-rotated, two names that would collide), a no-face image, a
    corrupt file, an empty file and a non-image file."""
    src = tmp_path_factory.mktemp("raw") / "photos"
    (src / "astronaut").mkdir(parents=True)
    (src / "crowd").mkdir()
    (src / "nobody").mkdir()
    upright, _ = paste([(0.8, 0, (200, 200))], shape=(400, 400))
    upright.save(src / "astronaut" / "a.jpg", quality=95)
    paste([(1.2, 20, (200, 200))], shape=(400, 400))[0].save(src / "astronaut" / "a.png")  # a.png too: collision
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(src / "astronaut" / "phone.jpg", quality=95, exif=exif)
    paste([(1.3, 0, (140, 200)), (0.6, 0, (330, 170))], shape=(360, 480))[0].save(src / "crowd" / "two.jpg")
    noise = np.random.default_rng(1).integers(0, 256, (200, 300, 3), np.uint8)
    Image.fromarray(noise).save(src / "nobody" / "noise.png")
    good = (src / "astronaut" / "a.jpg").read_bytes()
    (src / "nobody" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (src / "nobody" / "empty.jpg").write_bytes(b"")
    (src / "nobody" / "notes.txt").write_text("not an image")
    return src


def _outputs(dst: Path) -> set[str]:
    return {p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file() and p.name != ALIGNMENT_FILE}


def test_align_folder_writes_a_complete_imagefolder(mtcnn, raw_folder, tmp_path):
    dst = tmp_path / "aligned"
    seen = []
    meta = align_folder(raw_folder, dst, workers=2, batch_size=2, progress=lambda n, total: seen.append((n, total)))
    sources = [rel for rel, _ in list_image_folder(raw_folder).samples]
    assert sum(n for n, _ in seen) == len(sources) == 7 and {t for _, t in seen} == {7}
    on_disk = json.loads((dst / ALIGNMENT_FILE).read_text(encoding="utf-8"))
    assert on_disk == meta
    records = {r["path"]: r for r in meta["images"]}
    assert sorted(records) == sorted(sources)  # every source image, notes.txt is no image
    assert {r["output"] for r in records.values() if r["output"]} == _outputs(dst)
    assert records["astronaut/a.jpg"]["output"] == "astronaut/a.jpg.png"  # a.jpg and a.png both exist
    assert records["astronaut/a.png"]["output"] == "astronaut/a.png.png"
    assert records["astronaut/phone.jpg"]["output"] == "astronaut/phone.png"
    assert records["crowd/two.jpg"]["faces"] == 2
    assert records["nobody/noise.png"]["skip"] == "no_face"
    for name in ("truncated.jpg", "empty.jpg"):
        assert records[f"nobody/{name}"]["status"] == "skipped" and records[f"nobody/{name}"]["skip"] == "unreadable"
        assert records[f"nobody/{name}"]["reason"] and str(raw_folder) not in records[f"nobody/{name}"]["reason"]
    assert meta["counts"] == {"images": 7, "aligned": 4, "center": 0, "skipped": 3, "multi_face": 1,
                              "skipped_no_face": 1, "skipped_too_small": 0, "skipped_cut_off": 0,
                              "skipped_unreadable": 2, "skipped_error": 0}
    assert meta["identities_without_images"] == ["nobody"] and not (dst / "nobody").exists()
    assert meta["alignment"] == alignment_info(FaceAligner())
    for out in _outputs(dst):
        with Image.open(dst / out) as im:
            assert (im.format, im.size, im.mode) == ("PNG", (112, 112), "RGB")
    a = Image.open(dst / "astronaut/a.jpg.png")
    assert correlation(Image.open(dst / "astronaut/phone.png"), a) > 0.95  # EXIF applied
    assert correlation(Image.open(dst / "astronaut/a.png.png"), a) > 0.85  # rotated 20 deg, scale 1.5x
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned"]  # no staging folder left beside it

    # in one process, the same records (the pool keeps the order) and the same pixels up to float round-off:
    # MTCNN with 1 torch thread (pool workers) and with all threads (here) sums in another order, which moves the
    # landmarks by ~1e-5 px (below the records' rounding) and can flip a pixel's rounding to the next level
    again = align_folder(raw_folder, tmp_path / "again", workers=1)
    assert again["images"] == meta["images"]
    for out in _outputs(dst):
        pool_pixels = np.asarray(Image.open(dst / out), dtype=np.int16)
        here_pixels = np.asarray(Image.open(tmp_path / "again" / out), dtype=np.int16)
        assert np.abs(pool_pixels - here_pixels).max() <= 2 and (pool_pixels != here_pixels).mean() < 0.01, out

    with pytest.raises(FileExistsError, match="--overwrite"):
        align_folder(raw_folder, dst)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing"):
        align_folder(raw_folder, tmp_path / "other", overwrite=True)
    with pytest.raises(InputError, match="inside the source"):
        align_folder(raw_folder, raw_folder / "out")


def test_align_folder_is_all_or_nothing(mtcnn, raw_folder, tmp_path, monkeypatch):
    calls = []

    def failing(self, chunk, loaded=None):
        calls.append(chunk)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run stops half-way (Ctrl-C, a crash)
        return original(self, chunk, loaded)

    original = folder_job._Job.align
    monkeypatch.setattr(folder_job._Job, "align", failing)
    with pytest.raises(KeyboardInterrupt):
        align_folder(raw_folder, tmp_path / "aligned", workers=1, batch_size=1)
    assert list(tmp_path.iterdir()) == []  # neither DST nor its staging folder


def test_command_aligns_and_summarises(mtcnn, raw_folder, tmp_path, capsys):
    dst = tmp_path / "out"
    meta = facesiam_main(["align-faces", str(raw_folder), str(dst), "--workers", "1", "--no-progress",
                          "--on-no-face", "center", "--multi", "central"])
    assert meta["counts"]["center"] == 1 and (dst / "nobody" / "noise.png").is_file()
    assert meta["alignment"]["multi"] == "central"
    err = capsys.readouterr().err
    assert "7 images: 4 faces aligned, 2 skipped (2 unreadable), 1 with several faces, 1 centre-cropped" in err
    assert "images/s" in err and "nobody/empty.jpg" in err

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing"), str(tmp_path / "x"), "--no-progress"])
    message = str(exit_info.value.code)
    assert message.startswith("align_faces: ") and "missing" in message and "\n" not in message


def test_script_error_is_one_line_and_status_1(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "align_faces.py"), str(tmp_path / "missing"),
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("align_faces: ") and "missing" in lines[0], proc.stderr
