"""The arcface_torch recipes (launch/configs/{ms1mv3_r50,glint360k_r100,wf42m_r50_pfc02}.yaml): they load, they keep
arcface_torch's numbers, and each trains a few steps through the normal training entry on a synthetic insightface
RecordIO folder with .bin verification sets (MobileFaceNet in place of the IResNets: the recipe is under test here,
the IResNets in test_iresnet.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from facesiam.backbones import BACKBONES
from facesiam.config import config_from_overrides

from ..conftest import REPO, reset_accelerate

RECIPES = {
    # name: (backbone, loss, margin, scale, partial_fc, weight decay, arcface_torch's global batch, lr, warm-up epochs)
    "ms1mv3_r50": ("iresnet50", "arcface", math.degrees(0.5), 64.0, 1.0, 5e-4, 1024, 0.1, 0),
    "glint360k_r100": ("iresnet100", "cosface", 0.4, 64.0, 1.0, 1e-4, 1024, 0.1, 0),
    "wf42m_r50_pfc02": ("iresnet50", "cosface", 0.4, 64.0, 0.2, 5e-4, 4096, 0.4, 2),
}
"""The anchor's configs (arcface_torch/configs/ms1mv3_r50.py, glint360k_r100.py, wf42m_pfc02_8gpus_r50_bs4k.py),
with ArcFace's 0.5 rad in facesiam's degrees."""
GPUS = 8  # accelerate_configs/multi_gpu.yaml, as arcface_torch's configs assume
WF42M_IMAGES = 42_474_557


def _recipe(name: str) -> Path:
    return REPO / "launch" / "configs" / f"{name}.yaml"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_with_arcface_torchs_numbers(name):
    backbone, loss, margin, scale, pfc, wd, global_batch, lr, warm_epochs = RECIPES[name]
    cfg = config_from_overrides(_recipe(name), {})
    m, o = cfg.model, cfg.optim
    assert (m.backbone, m.head, m.embedding_dim, m.image_size) == (backbone, "face", 512, 112)
    assert m.image_size == BACKBONES.get(backbone).info["input_size"]
    assert (cfg.loss.loss, cfg.loss.partial_fc) == (loss, pfc)
    assert cfg.loss.margin == pytest.approx(margin, abs=1e-4) and cfg.loss.scale == scale
    assert (o.optimizer, o.scheduler, o.momentum, o.weight_decay, o.nesterov) == ("sgd", "poly", 0.9, wd, False)
    assert cfg.batch_size * GPUS == global_batch
    assert o.lr == pytest.approx(0.1 * global_batch / 1024) == lr, "lr scales linearly: 0.1 per 1024 images"
    assert o.warmup_steps == warm_epochs * (WF42M_IMAGES // global_batch if warm_epochs else 0)
    assert cfg.epochs == 20 and cfg.mixed_precision is None, "precision follows the launcher (multi_gpu.yaml: bf16)"
    assert [Path(p).name for p in cfg.val_bin.split(",")] == ["lfw.bin", "cfp_fp.bin", "agedb_30.bin"]


@pytest.fixture(scope="module")
def rec_and_bins(tmp_path_factory) -> tuple[Path, str]:
    """A RecordIO folder of 12 synthetic identities x 4 faces at 112 px (header 0 and identity table, as insightface
    writes them) and three .bin sets of 10 same + 10 different pairs from them."""
    from facesiam.data.recordio import write_rec
    from facesiam.eval.verification_bin import write_bin
    from facesiam.synthetic import make_synthetic_faces

    root = tmp_path_factory.mktemp("rec")
    faces = make_synthetic_faces(root / "faces", 12, 4, size=112, seed=0, workers=1, progress=False)
    people = sorted(p for p in faces.iterdir() if p.is_dir())
    photos = [sorted(p.iterdir()) for p in people]
    write_rec(root / "rec", [(f.read_bytes(), label) for label, files in enumerate(photos) for f in files],
              num_classes=len(people), image_size=(112, 112))
    bins = []
    for k, name in enumerate(("lfw", "cfp_fp", "agedb_30")):
        images, issame = [], []
        for i in range(10):
            a, b = (i + k) % 12, (i + k + 5) % 12
            images += [photos[a][0].read_bytes(), photos[a][1 + i % 3].read_bytes()]
            images += [photos[a][2].read_bytes(), photos[b][3].read_bytes()]
            issame += [True, False]
        bins.append(str(write_bin(root / f"{name}.bin", images, issame)))
    return root / "rec", ",".join(bins)


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_a_few_steps_on_a_rec_and_validates_on_bins(name, rec_and_bins, tmp_path):
    from facesiam.commands.train import main

    rec, bins = rec_and_bins
    out = tmp_path / "run"
    reset_accelerate()
    try:
        summary = main(["--config", str(_recipe(name)), "--data", str(rec), "--val-bin", bins, "--output", str(out),
                        "--backbone", "mobilefacenet", "--batch-size", "8", "--max-steps", "3", "--num-workers", "0",
                        "--log-every-steps", "1", "--wandb", "off", "--tensorboard", "false"])
    finally:
        reset_accelerate()
    assert summary["steps"] == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "loss" in r]
    warm = RECIPES[name][8] and config_from_overrides(_recipe(name), {}).optim.warmup_steps
    peak = RECIPES[name][7]
    # poly over the run's 3 steps (warm-up, where there is one, is longer than the run: linear from peak / warm); the
    # lr logged with step s is the one the schedule set after it, for step s + 1
    expected = [peak * (s + 2) / warm for s in range(3)] if warm else [peak * (1 - (s + 1) / 3) ** 2 for s in range(3)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    validated = [r for r in records if "bin/cfp_fp/accuracy" in json.dumps(r)]
    assert validated, "the .bin sets were scored"
    exported = json.loads((out / "best" / "config.json").read_text())
    assert (exported["backbone"], exported["head"], exported["image_size"]) == ("mobilefacenet", "face", 112)
