"""Embedding: order, eval mode, flip averaging, the .npz format, shard splits, and 2 processes under accelerate."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facesiam.commands.embed import main
from facesiam.errors import InputError

from ..conftest import REPO, accelerate_launch
from facesiam.eval.embed import embed_dataset, load_embeddings, save_embeddings



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


class _HungAfterFirst(torch.utils.data.Dataset):
    """Image 0 arrives; the worker then hangs on image 1 (a deadlocked decoder, a stuck file system)."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        if i:
            import time

            time.sleep(3600)
        return torch.zeros(3, 32, 32), 0


def test_a_hung_loader_worker_is_an_error_not_a_hang(tiny_model_dir):
    from facesiam.model import load_exported

    model, _ = load_exported(tiny_model_dir)
    with pytest.raises(RuntimeError, match="timed out after 2 seconds"):
        embed_dataset(model, _HungAfterFirst(), batch_size=1, num_workers=1, loader_timeout=2, progress=False)


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


def test_load_embeddings_rejects_other_files_and_derives_what_it_can(tmp_path):
    np.savez(tmp_path / "x.npz", embeddings=np.zeros((2, 3), np.float32))
    with pytest.raises(InputError, match="x.npz: no 'labels' array"):
        load_embeddings(tmp_path / "x.npz")
    # Only embeddings and labels are needed: classes come from the labels, paths stay absent (only --pairs needs them).
    np.savez(tmp_path / "bare.npz", embeddings=np.ones((3, 2), np.float32), labels=np.array([0, 2, 2]))
    bare = load_embeddings(tmp_path / "bare.npz")
    assert bare["classes"] == ["0", "1", "2"] and bare["paths"] is None
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="junk.npz: not a readable .npz"):
        load_embeddings(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="tools/embed.py"):
        load_embeddings(tmp_path / "nothing.npz")
    save_embeddings(tmp_path / "ok.npz", np.ones((2, 3)), [0, 1], ["a/1", "b/1"], ["a", "b"])
    assert load_embeddings(tmp_path / "ok.npz")["paths"] == ["a/1", "b/1"]


def test_two_processes_embed_their_shares_and_gather_in_order(tiny_model_dir, face_folder, tmp_path):
    proc = accelerate_launch(REPO / "tools" / "embed.py", [
        "--checkpoint", str(tiny_model_dir), "--data", str(face_folder), "--out", str(tmp_path / "two.npz"),
        "--num-workers", "0", "--batch-size", "6"])
    assert "2 process(es)" in proc.stderr
    two = load_embeddings(tmp_path / "two.npz")
    model, ds = _dataset(tiny_model_dir, face_folder)
    one, labels = embed_dataset(model, ds, progress=False)
    np.testing.assert_allclose(two["embeddings"], one, atol=1e-5)
    np.testing.assert_array_equal(two["labels"], labels)
