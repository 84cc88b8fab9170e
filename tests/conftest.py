"""Shared fixtures: tiny synthetic face shards (built once per session) and the real-data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Keep every test process to one BLAS/OpenMP thread: CI has 2 cores and the distributed tests start 2 ranks.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shared_dataset(name: str) -> Path:
    """Path to ../shared/data/<name>, or skip the test when the shared data is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not present (real face data lives in ../shared/data beside the repo)")
    return path


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """24 synthetic identities x 8 images at 48 px, 6 identities held out as 'val'."""
    from facesiam.data import make_synthetic_faces, write_shards

    root = tmp_path_factory.mktemp("synthetic")
    faces = make_synthetic_faces(root / "faces", 24, 8, size=48, seed=0, workers=1, progress=False)
    write_shards(faces, root / "shards", val_identities=6, seed=0, workers=1, progress=False)
    return root / "shards"
