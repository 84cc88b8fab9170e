"""Tests for facesiam.augment.transforms (train/eval recipes, centre crop) and seeded transform application."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from facesiam.augment.transforms import build_eval_transform, build_train_transform
from facesiam.data import apply_seeded
from facesiam.augment.transforms import IMAGENET_MEAN, IMAGENET_STD, CenterCropFraction


def _face(width=250, height=250, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_train_transform_is_the_seed_recipe_by_default():
    t = build_train_transform(224)
    kinds = [type(s) for s in t.transforms]
    assert kinds == [T.RandomHorizontalFlip, T.RandomRotation, T.RandomResizedCrop, T.ColorJitter, T.ToTensor,
                     T.Normalize]
    flip, rotation, crop, jitter, _, norm = t.transforms
    assert flip.p == 0.5 and rotation.degrees == [-15.0, 15.0]
    assert crop.size == (224, 224) and crop.scale == (0.8, 1.0)
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.8, 1.2) and jitter.hue is None
    assert tuple(norm.mean) == IMAGENET_MEAN and tuple(norm.std) == IMAGENET_STD
    x = t(_face())
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32


def test_zero_disables_train_stages():
    t = build_train_transform(32, crop_scale=None, rotation=0, hflip=0, color_jitter=0)
    assert [type(s) for s in t.transforms] == [T.Resize, T.ToTensor, T.Normalize]
    img = _face(64, 48)
    torch.testing.assert_close(t(img), build_eval_transform(32)(img))  # nothing random is left
    assert type(build_train_transform(32, crop_scale=0).transforms[2]) is T.Resize


def test_eval_transform_normalises_and_resizes():
    img = Image.new("RGB", (50, 30), (124, 116, 104))  # ~ the ImageNet mean in 0..255
    x = build_eval_transform(20)(img)
    assert x.shape == (3, 20, 20)
    expected = (torch.tensor([124, 116, 104]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[:, 10, 10], expected.float())
    y = build_eval_transform(20, mean=(0, 0, 0), std=(1, 1, 1))(img)
    torch.testing.assert_close(y[:, 0, 0], torch.tensor([124, 116, 104]) / 255)


def test_center_crop_keeps_the_middle_fraction_of_the_shorter_side():
    img = Image.new("RGB", (250, 200), (0, 0, 255))
    img.paste((255, 0, 0), (65, 40, 185, 160))  # a red 120x120 square in the centre
    cropped = CenterCropFraction(0.6)(img)
    assert cropped.size == (120, 120) and (np.asarray(cropped) == [255, 0, 0]).all()
    tensor = CenterCropFraction(0.6)(torch.zeros(3, 200, 250))
    assert tensor.shape == (3, 120, 120)
    x = build_eval_transform(16, center_crop=0.6, mean=(0, 0, 0), std=(1, 1, 1))(img)
    torch.testing.assert_close(x, torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 16, 16))
    t = build_train_transform(16, center_crop=0.6, rotation=0, color_jitter=0, mean=(0, 0, 0), std=(1, 1, 1))
    assert isinstance(t.transforms[0], CenterCropFraction)
    for _ in range(5):  # any crop of the red centre stays red
        torch.testing.assert_close(t(img), x)


def test_seeded_application_is_reproducible_and_restores_rng():
    t = build_train_transform(32)
    img = _face(64, 64)
    torch.manual_seed(1)
    random.seed(1)
    expected_torch, expected_py = torch.rand(2), random.random()
    torch.manual_seed(1)
    random.seed(1)
    a, b, c = apply_seeded(t, img, 11), apply_seeded(t, img, 11), apply_seeded(t, img, 12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.rand(2), expected_torch) and random.random() == expected_py
    seeds = [apply_seeded(t, img, s) for s in range(6)]
    assert len({tuple(s.flatten()[:50].tolist()) for s in seeds}) == 6  # different seeds, different views


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="image_size"):
        build_eval_transform(0)
    with pytest.raises(ValueError, match="center_crop"):
        build_eval_transform(32, center_crop=1.5)
    with pytest.raises(ValueError, match="crop_scale"):
        build_train_transform(32, crop_scale=(0.9, 0.5))
    with pytest.raises(ValueError, match="hflip"):
        build_train_transform(32, hflip=2)
