"""The batched augmentation (augment_device cuda / cpu) against the per-image fused path: the same seed gives the same
parameters and, up to uint8 rounding, the same image; a sample does not depend on the batch it is padded into; the
loader ships uint8 and ModelInput normalises on the device; bad settings are refused in one line.

Real face: the astronaut photo shipped with scikit-image (Eileen Collins, NASA, public domain).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import skimage.data

from facesiam.data import ShardDataset
from facesiam.augment.batch import (AugmentBatch, BatchAugment, DeferredTrainTransform, ModelInput, collate,
                                         normalise)
from facesiam.data.readers import apply_seeded
from facesiam.augment.transforms import build_train_transform
from facesiam.errors import InputError

pytest.importorskip("cv2")

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
RECIPES = {
    "seed-224": (224, dict(crop_scale=(0.8, 1.0), rotation=15.0, hflip=0.5, color_jitter=0.2)),
    "seed-112": (112, dict(crop_scale=(0.8, 1.0), rotation=15.0, hflip=0.5, color_jitter=0.2)),
    "centre-crop": (160, dict(crop_scale=(0.8, 1.0), rotation=10.0, hflip=0.5, color_jitter=0.3, center_crop=0.7)),
    "strong-jitter-small-crops": (64, dict(crop_scale=(0.1, 1.0), rotation=30.0, hflip=0.5, color_jitter=0.6)),
    "no-jitter": (96, dict(crop_scale=None, rotation=5.0, hflip=0.5, color_jitter=0.0)),
}


@pytest.fixture(scope="module")
def faces() -> list[Image.Image]:
    """The same face at three sizes and aspect ratios, so that a batch pads its sources."""
    photo = Image.fromarray(skimage.data.astronaut())
    return [photo.resize(s, Image.BILINEAR) for s in ((250, 250), (300, 180), (120, 200))]


def batch_of(deferred, faces, seeds):
    return collate([(apply_seeded(deferred, faces[s % len(faces)], s), s % 3) for s in seeds])


@pytest.mark.parametrize("name", list(RECIPES))
def test_the_batch_path_gives_the_loader_path_image_for_the_same_seed(name, faces):
    size, kw = RECIPES[name]
    fused = build_train_transform(size, mean=MEAN, std=STD, implementation="fused", **kw)
    seeds = range(10)
    want = torch.stack([apply_seeded(fused, faces[s % len(faces)], s) for s in seeds]).float()
    batch, labels = batch_of(DeferredTrainTransform(fused), faces, seeds)
    assert isinstance(batch, AugmentBatch) and labels.tolist() == [s % 3 for s in seeds]
    got = BatchAugment(size)(batch)
    assert got.shape == want.shape == (len(seeds), 3, size, size)
    for k in range(len(seeds)):
        # in grey levels: the loader path rounds to uint8 after the warp and after the colour matrix
        diff = float((got[k] - want[k]).abs().mean())
        assert diff < 1.0, (k, diff)
        assert np.corrcoef(got[k].flatten(), want[k].flatten())[0, 1] > 0.995, k


def test_a_sample_does_not_depend_on_the_batch_it_is_padded_into(faces):
    size, kw = RECIPES["seed-112"]
    deferred = DeferredTrainTransform(build_train_transform(size, implementation="fused", **kw))
    augment = BatchAugment(size)
    alone = augment(batch_of(deferred, faces, [3])[0])  # faces[0]: 250 x 250
    # with a larger, differently shaped source next to it, its source is padded on two sides
    mixed = augment(batch_of(deferred, faces, [3, 1, 2])[0])
    assert batch_of(deferred, faces, [3, 1, 2])[0].sources.shape[1:3] != (250, 250)
    torch.testing.assert_close(mixed[0], alone[0], atol=0.02, rtol=0)  # grey levels: float32 round-off


def test_the_seeded_batch_is_reproducible_and_seeds_differ(faces):
    size, kw = RECIPES["seed-224"]
    deferred = DeferredTrainTransform(build_train_transform(size, implementation="fused", **kw))
    augment = BatchAugment(size)
    a, b = augment(batch_of(deferred, faces, [5, 6])[0]), augment(batch_of(deferred, faces, [5, 6])[0])
    assert torch.equal(a, b)
    assert not torch.equal(a[0], augment(batch_of(deferred, faces, [7])[0])[0])


def test_model_input_normalises_uint8_on_the_device_as_the_reference_does():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    want = (images.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    got = ModelInput(torch.device("cpu"), mean=MEAN, std=STD)(images)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    floats = torch.randn(2, 3, 8, 8)  # the torchvision reference ships normalised floats: passed through
    assert torch.equal(ModelInput(torch.device("cpu"), mean=MEAN, std=STD)(floats), floats)
    last = ModelInput(torch.device("cpu"), mean=MEAN, std=STD, channels_last=True)(images)
    assert last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(last, got)


def test_model_input_augments_an_augment_batch_then_normalises(faces):
    size, kw = RECIPES["seed-112"]
    deferred = DeferredTrainTransform(build_train_transform(size, mean=MEAN, std=STD, implementation="fused", **kw))
    batch, _ = batch_of(deferred, faces, [0, 1])
    x = ModelInput(torch.device("cpu"), mean=MEAN, std=STD, image_size=size, augment_device="cpu")(batch)
    torch.testing.assert_close(x, normalise(BatchAugment(size)(batch), MEAN, STD))
    with pytest.raises(InputError, match="augment_device loader"):
        ModelInput(torch.device("cpu"), mean=MEAN, std=STD)(batch)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_augmentation_without_cuda_is_refused_in_one_line():
    with pytest.raises(InputError, match="--augment-device cpu") as err:
        ModelInput(torch.device("cpu"), mean=MEAN, std=STD, image_size=32, augment_device="cuda")
    assert "\n" not in str(err.value)


def test_the_batch_path_needs_the_fused_implementation(synthetic_shards, tmp_path):
    from facesiam.commands.train import main

    with pytest.raises(SystemExit, match="augment-implementation fused"):  # main's one-line error
        main(["--data", str(synthetic_shards), "--output", str(tmp_path / "run"), "--backbone", "test_efficientnet",
              "--image-size", "32", "--augment-implementation", "torchvision", "--augment-device", "cpu",
              "--wandb", "off"])


def test_loader_workers_ship_deferred_samples_that_collate_into_a_batch(synthetic_shards):
    size, kw = RECIPES["seed-112"]
    fused = build_train_transform(size, implementation="fused", **kw)
    ds = ShardDataset(synthetic_shards, "train", transform=DeferredTrainTransform(fused))
    loader = torch.utils.data.DataLoader(ds, batch_size=6, num_workers=2, collate_fn=collate, timeout=120)
    batch, labels = next(iter(loader))
    assert isinstance(batch, AugmentBatch) and len(batch) == len(labels) == 6
    assert batch.sources.dtype == torch.uint8 and batch.theta.shape == (6, 2, 3) and batch.colour.shape == (6, 8)
    assert BatchAugment(size)(batch).shape == (6, 3, size, size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_and_cpu_batch_augmentation_agree(faces):
    size, kw = RECIPES["seed-224"]
    deferred = DeferredTrainTransform(build_train_transform(size, implementation="fused", **kw))
    batch, _ = batch_of(deferred, faces, range(6))
    cpu = BatchAugment(size)(batch)
    gpu = BatchAugment(size)(batch.pin_memory().to("cuda")).cpu()
    torch.testing.assert_close(gpu, cpu, atol=0.05, rtol=0)


def test_the_fused_loader_batch_is_a_channels_last_stack_of_the_images(faces):
    size, kw = RECIPES["seed-112"]
    fused = build_train_transform(size, mean=MEAN, std=STD, implementation="fused", **kw)
    images = [apply_seeded(fused, faces[s % 3], s) for s in range(5)]
    batch, labels = collate([(im, k) for k, im in enumerate(images)])
    assert batch.shape == (5, 3, size, size) and batch.dtype == torch.uint8 and labels.tolist() == list(range(5))
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack(images))
    x = ModelInput(torch.device("cpu"), mean=MEAN, std=STD)(batch)
    assert x.is_contiguous()  # the model gets the layout it asked for
    torch.testing.assert_close(x, normalise(torch.stack(images), MEAN, STD))
