"""The fused training augmentation against the torchvision reference: the same parameters drawn for the same seed,
the same geometry and colour for those parameters, and the same image statistics over many draws.

Real face: the astronaut photo shipped with scikit-image (Eileen Collins, NASA, public domain).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms as T

import skimage.data

from facesiam.augment.batch import normalise
from facesiam.augment.fused import RATIO, FusedTrainTransform
from facesiam.data.images import decode_rgb, decode_rgb_array, jpeg_size
from facesiam.data.readers import apply_seeded
from facesiam.augment.transforms import build_train_transform

pytest.importorskip("cv2")

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
RECIPES = {  # (size, options): the seed article's at 224, lfw_aligned.yaml's at 112, a centre crop, nothing random
    "seed-224": (224, dict(crop_scale=(0.8, 1.0), rotation=15.0, hflip=0.5, color_jitter=0.2, center_crop=None)),
    "seed-112": (112, dict(crop_scale=(0.8, 1.0), rotation=15.0, hflip=0.5, color_jitter=0.2, center_crop=None)),
    "aligned-112": (112, dict(crop_scale=(0.9, 1.0), rotation=0.0, hflip=0.5, color_jitter=0.2, center_crop=None)),
    "centre-crop": (160, dict(crop_scale=(0.8, 1.0), rotation=10.0, hflip=0.5, color_jitter=0.3, center_crop=0.7)),
    "resize-only": (112, dict(crop_scale=None, rotation=0.0, hflip=0.0, color_jitter=0.0, center_crop=None)),
}


@pytest.fixture(scope="module")
def face() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut()).resize((250, 250), Image.BILINEAR)


def pair(name):
    """(reference, fused): the fused path's uint8 output normalised as the training step does (ModelInput)."""
    size, kw = RECIPES[name]
    fused = build_train_transform(size, mean=MEAN, std=STD, implementation="fused", **kw)

    def fused_normalised(img):
        out = fused(img)
        assert out.dtype == torch.uint8 and out.shape == (3, size, size)
        return normalise(out[None], MEAN, STD)[0]

    return build_train_transform(size, mean=MEAN, std=STD, **kw), fused_normalised


def reference_draws(size: int, kw: dict, width: int, height: int) -> dict:
    """The parameters the reference transforms draw, in their order (torchvision's own get_params)."""
    flip = bool(kw["hflip"]) and bool(torch.rand(1) < kw["hflip"])
    angle = T.RandomRotation.get_params([-kw["rotation"], kw["rotation"]]) if kw["rotation"] else 0.0
    crop = (T.RandomResizedCrop.get_params(torch.zeros(1, height, width), list(kw["crop_scale"]), list(RATIO))
            if kw["crop_scale"] else (0, 0, height, width))
    jitter = None
    if kw["color_jitter"]:
        j = (1 - kw["color_jitter"], 1 + kw["color_jitter"])
        order, b, c, s, _ = T.ColorJitter.get_params(j, j, j, None)
        jitter = ([int(k) for k in order], b, c, s)
    return {"flip": flip, "angle": angle, "crop": crop, "jitter": jitter}


@pytest.mark.parametrize("name", list(RECIPES))
def test_the_same_seed_draws_the_same_parameters_as_the_reference(name):
    size, kw = RECIPES[name]
    fused = FusedTrainTransform(size, **kw)
    for seed in range(50):
        torch.manual_seed(seed)
        want = reference_draws(size, kw, 250, 250)
        torch.manual_seed(seed)
        assert fused.sample(250, 250) == want, seed


def test_parameter_distributions():
    size, kw = RECIPES["seed-224"]
    fused = FusedTrainTransform(size, **kw)
    torch.manual_seed(0)
    draws = [fused.sample(250, 250) for _ in range(3000)]
    angles = np.array([d["angle"] for d in draws])
    assert stats.kstest(angles, stats.uniform(-15, 30).cdf).pvalue > 1e-3
    assert stats.binomtest(sum(d["flip"] for d in draws), len(draws), 0.5).pvalue > 1e-3
    area = np.array([d["crop"][2] * d["crop"][3] for d in draws]) / 250 ** 2
    assert area.min() >= 0.79 and area.max() <= 1.0
    for k in (1, 2, 3):  # brightness, contrast, saturation factors: uniform on [0.8, 1.2]
        assert stats.kstest([d["jitter"][k] for d in draws], stats.uniform(0.8, 0.4).cdf).pvalue > 1e-3
    assert len({tuple(d["jitter"][0]) for d in draws}) == 24  # every order of the four colour stages


@pytest.mark.parametrize("name", list(RECIPES))
def test_for_the_same_parameters_the_image_matches_the_reference(name, face):
    reference, fused = pair(name)
    for seed in range(12):
        a = apply_seeded(reference, face, seed)
        b = apply_seeded(fused, face, seed)
        assert a.shape == b.shape == (3, RECIPES[name][0], RECIPES[name][0]) and b.dtype == torch.float32
        # in 0..255 grey levels: the two differ by interpolation (one warp vs two, area vs antialiased filter)
        diff = float(((a - b) * torch.tensor(STD).view(3, 1, 1)).abs().mean()) * 255
        assert diff < 6.0, (seed, diff)
        assert np.corrcoef(a.flatten(), b.flatten())[0, 1] > 0.99, seed


def test_over_many_draws_the_image_statistics_agree(face):
    reference, fused = pair("seed-112")
    a = torch.stack([apply_seeded(reference, face, s) for s in range(300)])
    b = torch.stack([apply_seeded(fused, face, 10_000 + s) for s in range(300)])  # independent draws
    mean_a, mean_b = a.mean(0), b.mean(0)
    std_a, std_b = a.std(0), b.std(0)
    # the average augmented image and the per-pixel spread of the two paths (normalised units)
    assert float((mean_a - mean_b).abs().mean()) < 0.1 * float(std_a.mean())
    assert np.corrcoef(mean_a.flatten(), mean_b.flatten())[0, 1] > 0.98
    assert np.corrcoef(std_a.flatten(), std_b.flatten())[0, 1] > 0.9
    for c in range(3):  # the distribution of per-image channel means
        assert stats.ks_2samp(a[:, c].mean((1, 2)), b[:, c].mean((1, 2))).pvalue > 1e-3


def test_a_seeded_sample_is_reproducible(face):
    _, fused = pair("seed-224")
    assert torch.equal(apply_seeded(fused, face, 7), apply_seeded(fused, face, 7))
    assert not torch.equal(apply_seeded(fused, face, 7), apply_seeded(fused, face, 8))


def test_jpegs_decode_reduced_only_while_large_enough(face):
    buf = io.BytesIO()
    face.save(buf, "JPEG", quality=90)
    assert decode_rgb(buf.getvalue()).size == (250, 250)
    assert decode_rgb(buf.getvalue(), draft=118).size == (125, 125)  # 1/2 scale keeps >= 118
    assert decode_rgb(buf.getvalue(), draft=200).size == (250, 250)  # 1/2 would be too small
    png = io.BytesIO()
    face.save(png, "PNG")
    assert decode_rgb(png.getvalue(), draft=50).size == (250, 250)  # only JPEG has a reduced decode


def test_the_opencv_array_decode_gives_pil_pixels_at_every_draft(face):
    buf = io.BytesIO()
    face.save(buf, "JPEG", quality=90)
    for draft in (None, 30, 62, 118, 200):
        want = np.asarray(decode_rgb(buf.getvalue(), draft)).astype(int)
        got = decode_rgb_array(buf.getvalue(), draft)
        assert got.dtype == np.uint8 and got.shape == want.shape, draft
        assert np.abs(got.astype(int) - want).max() <= 1, draft  # the same libjpeg IDCT; allow one level
    grey = io.BytesIO()
    face.convert("L").save(grey, "PNG")
    got = decode_rgb_array(grey.getvalue(), 50)  # PNG: full size; grey: three equal channels, as PIL's RGB
    np.testing.assert_array_equal(got, np.asarray(decode_rgb(grey.getvalue())))


def test_the_fused_transform_takes_the_array_as_it_takes_the_image(face):
    _, fused = pair("seed-224")
    assert torch.equal(apply_seeded(fused, np.asarray(face), 3), apply_seeded(fused, face, 3))


def test_jpeg_size_reads_the_frame_header_as_pil_does(face):
    img = face.resize((321, 123))
    for kw in ({}, {"progressive": True}, {"quality": 50, "subsampling": 0}):
        buf = io.BytesIO()
        img.save(buf, "JPEG", **kw)
        assert jpeg_size(buf.getvalue()) == Image.open(io.BytesIO(buf.getvalue())).size == (321, 123), kw
    png = io.BytesIO()
    img.save(png, "PNG")
    assert jpeg_size(png.getvalue()) is None
    assert jpeg_size(b"\xff\xd8\xff\xe0\x00") is None  # truncated before any frame header
