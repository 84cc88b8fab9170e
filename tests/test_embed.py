"""Embedding: order, eval mode, flip averaging, the .npz format, shard splits, and 2 processes under accelerate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facesiam.embed import embed_dataset, load_embeddings, main, save_embeddings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny timm model exported like a training run's best/."""
    from facesiam.config import ModelConfig
    from facesiam.model import build_model, export_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_efficientnet", embedding_dim=32, image_size=32)
    return export_model(build_model(cfg), cfg, tmp_path_factory.mktemp("run") / "best")


@pytest.fixture(scope="session")
def face_folder(tmp_path_factory) -> Path:
    """10 synthetic identities x 4 images (48 px) as an ImageFolder."""
    from facesiam.data import make_synthetic_faces

    return make_synthetic_faces(tmp_path_factory.mktemp("faces") / "faces", 10, 4, size=48, seed=1, workers=1,
                                progress=False)


def _dataset(model_dir, folder):
    from facesiam.data import open_dataset
    from facesiam.model import eval_transform_for, load_exported

    model, cfg = load_exported(model_dir)
    return model, open_dataset(folder, transform=eval_transform_for(cfg))


def test_embed_dataset_order_eval_mode_and_flip(tiny_model_dir, face_folder):
    model, ds = _dataset(tiny_model_dir, face_folder)
    model.train()  # embed_dataset must switch to eval (BatchNorm statistics) and give the mode back
    emb, labels = embed_dataset(model, ds, batch_size=7, progress=False)
    assert model.training
    model.eval()
    with torch.no_grad():
        images = torch.stack([ds[i][0] for i in range(len(ds))])
        direct = model(images)
        flipped = F.normalize(direct + model(torch.flip(images, dims=[3])), dim=1)
    assert emb.dtype == np.float32 and emb.shape == (40, 32)
    np.testing.assert_array_equal(labels, ds.labels)
    np.testing.assert_allclose(emb, direct.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    emb_flip, _ = embed_dataset(model, ds, batch_size=16, flip=True, progress=False)
    np.testing.assert_allclose(emb_flip, flipped.numpy(), atol=1e-5)
    assert not np.allclose(emb_flip, emb, atol=1e-3)


def test_embed_command_on_folder_and_shard_split(tiny_model_dir, face_folder, synthetic_shards, tmp_path):
    from facesiam.data import open_dataset

    main(["--checkpoint", str(tiny_model_dir), "--data", str(face_folder), "--out", str(tmp_path / "f.npz"),
          "--num-workers", "0"])
    f = load_embeddings(tmp_path / "f.npz")
    ds = open_dataset(face_folder)
    assert f["paths"] == ds.paths and f["classes"] == ds.classes and f["meta"]["flip"] is False
    assert f["embeddings"].shape == (40, 32) and f["labels"].tolist() == ds.labels.tolist()
    main(["--checkpoint", str(tiny_model_dir), "--data", str(synthetic_shards), "--split", "val", "--out",
          str(tmp_path / "s.npz"), "--num-workers", "0", "--flip"])
    s = load_embeddings(tmp_path / "s.npz")
    val = open_dataset(synthetic_shards, split="val")
    assert s["paths"] == val.paths and s["labels"].tolist() == val.labels.tolist() and s["meta"]["flip"] is True
    assert len(s["embeddings"]) == len(val) and s["meta"]["split"] == "val"


def test_load_embeddings_rejects_other_files(tmp_path):
    np.savez(tmp_path / "x.npz", embeddings=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="missing"):
        load_embeddings(tmp_path / "x.npz")
    with pytest.raises(FileNotFoundError, match="tools/embed.py"):
        load_embeddings(tmp_path / "nothing.npz")
    save_embeddings(tmp_path / "ok.npz", np.ones((2, 3)), [0, 1], ["a/1", "b/1"], ["a", "b"])
    assert load_embeddings(tmp_path / "ok.npz")["paths"] == ["a/1", "b/1"]


def test_two_processes_embed_their_shares_and_gather_in_order(tiny_model_dir, face_folder, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "accelerate_configs" / "cpu.yaml"), "--main_process_port", "0", str(REPO / "tools" / "embed.py"),
           "--checkpoint", str(tiny_model_dir), "--data", str(face_folder), "--out", str(tmp_path / "two.npz"),
           "--num-workers", "0", "--batch-size", "6"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "2 process(es)" in proc.stderr
    two = load_embeddings(tmp_path / "two.npz")
    model, ds = _dataset(tiny_model_dir, face_folder)
    one, labels = embed_dataset(model, ds, progress=False)
    np.testing.assert_allclose(two["embeddings"], one, atol=1e-5)
    np.testing.assert_array_equal(two["labels"], labels)
