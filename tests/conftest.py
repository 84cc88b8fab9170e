"""Shared test helpers and fixtures: tiny synthetic shards and models (built once per session), the real-data
location, N CPU processes over gloo, and subprocesses that can never hang the suite."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SUBPROCESS_TIMEOUT = 600  # seconds: a hung gloo rendezvous or a deadlock fails its test instead of hanging CI

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


from facesiam.testing import free_port  # noqa: E402,F401  the tests' servers bind to it (as the benchmarks' do)


def load_tool(name: str):
    """tools/NAME.py as a module (the tools are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_python(args: list[str], *, timeout: float = SUBPROCESS_TIMEOUT, check: bool = True,
               **kwargs) -> subprocess.CompletedProcess:
    """``python ARGS`` with the repo importable, one thread per process, captured text output and a timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **kwargs.pop("env", {})}
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          **kwargs)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def accelerate_launch(script: Path, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``accelerate launch`` with the repo's cpu.yaml: two gloo processes on this machine."""
    return run_python(["-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"),
                       "--main_process_port", "0", str(script), *args], **kwargs)


# ------------------------------------------------------------------------------------------ N processes on gloo

def _entry(rank: int, world: int, init_file: str, fn, args, results) -> None:
    import torch
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results[rank] = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int = 2, *args, timeout: float = SUBPROCESS_TIMEOUT):
    """Call fn(rank, world, *args) in `world` spawned processes; return the list of their results.

    ``fn`` must be importable (a module-level function of a test module) for spawn to pickle it. Ranks that have
    not all finished within ``timeout`` seconds (a hung gloo rendezvous or collective) are terminated and the test
    fails with a TimeoutError naming the ranks still running.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        context = mp.spawn(_entry, args=(world, os.path.join(tmp, "init"), fn, args, results), nprocs=world,
                           join=False)
        deadline = time.monotonic() + timeout
        try:
            # join() is True once every rank has exited, and raises as soon as one fails; the deadline is ours.
            while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
                    raise TimeoutError(f"run_distributed({getattr(fn, '__name__', fn)}, world={world}): rank(s) "
                                       f"{alive} still running after {timeout:g}s (a hung gloo rendezvous or "
                                       f"collective?); terminated")
        finally:
            _terminate(context.processes)
        return [results[r] for r in range(world)]


def _terminate(processes) -> None:
    """SIGTERM, then SIGKILL after 10 s, every process still alive; never leaves one behind."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join(timeout=10)


# ------------------------------------------------------------------------------------------ session fixtures

@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """24 synthetic identities x 8 images at 48 px, 6 identities held out as 'val'."""
    from facesiam.data import write_shards
    from facesiam.synthetic import make_synthetic_faces

    root = tmp_path_factory.mktemp("synthetic")
    faces = make_synthetic_faces(root / "faces", 24, 8, size=48, seed=0, workers=1, progress=False)
    write_shards(faces, root / "shards", val_identities=6, seed=0, workers=1, progress=False)
    return root / "shards"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny timm model exported like a training run's best/."""
    import torch

    from facesiam.config import ModelConfig
    from facesiam.model import build_model, export_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_efficientnet", embedding_dim=32, image_size=32)
    return export_model(build_model(cfg), cfg, tmp_path_factory.mktemp("run") / "best")


@pytest.fixture(scope="session")
def face_folder(tmp_path_factory) -> Path:
    """10 synthetic identities x 4 images (48 px) as an ImageFolder."""
    from facesiam.synthetic import make_synthetic_faces

    return make_synthetic_faces(tmp_path_factory.mktemp("faces") / "faces", 10, 4, size=48, seed=1, workers=1,
                                progress=False)


def photo(scale: float, degrees: float, offset: tuple[int, int], tint: tuple[int, int, int] = (128, 128, 128),
          canvas: int = 400):
    """A real 'raw photo': the astronaut's head and shoulders (skimage.data.astronaut(): Eileen Collins, NASA,
    public domain), scaled, rotated and placed on a plain canvas."""
    import skimage.data
    from PIL import Image

    head = Image.fromarray(skimage.data.astronaut()[0:300, 80:380])
    head = head.resize((round(300 * scale),) * 2, Image.BILINEAR).rotate(degrees, Image.BILINEAR, fillcolor=tint)
    out = Image.new("RGB", (canvas, canvas), tint)
    out.paste(head, offset)
    return out


@pytest.fixture(scope="session")
def aligned_model(tmp_path_factory) -> Path:
    """A random tiny model exported as if trained on 112x112 aligned faces (config.json records the alignment)."""
    import torch

    from facesiam.config import ModelConfig
    from facesiam.faces.aligner import FaceAligner, alignment_info
    from facesiam.model import build_model, export_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_efficientnet", embedding_dim=32, image_size=64)
    return export_model(build_model(cfg), cfg, tmp_path_factory.mktemp("aligned") / "best",
                        alignment=alignment_info(FaceAligner()))


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair (facesiam/testing/netns.py), removed after the test; the test
    skips, saying why, where they cannot be made (not root, no iproute2, a container without CAP_SYS_ADMIN)."""
    from facesiam.testing.netns import NetnsUnavailable, TwoHosts

    hosts = TwoHosts()
    try:
        hosts.__enter__()
    except NetnsUnavailable as why:
        pytest.skip(str(why))
    try:
        yield hosts
    finally:
        hosts.close()


def reset_accelerate() -> None:
    """Forget accelerate's process-wide singletons, so the next Accelerator in this process starts clean."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


# ------------------------------------------------------------------------------------------ shards at URLs

@pytest.fixture(scope="module")
def s3():
    """moto's S3-compatible server (facesiam/testing/servers.py) for one test module; fsspec's s3 options point at it
    (what FSSPEC_S3_ENDPOINT_URL=... does); bucket 'faces'. Skips without fsspec, aiohttp, s3fs or moto[server]
    (``pip install -e ".[dev]"`` installs them)."""
    fsspec = pytest.importorskip("fsspec")
    for module in ("aiohttp", "s3fs", "moto.server"):
        pytest.importorskip(module)
    from facesiam.testing.servers import S3_ENV, start_moto

    patch = pytest.MonkeyPatch()
    for key, value in S3_ENV.items():
        patch.setenv(key, value)
    server, endpoint = start_moto()

    def reset() -> None:  # moto's state is per process, not per server: empty it for the next module
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30)

    try:
        reset()
        patch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("faces")
        yield endpoint
    finally:
        reset()
        server.stop()
        patch.undo()


@contextlib.contextmanager
def served_shards(kind: str, local: Path, request: pytest.FixtureRequest):
    """The shard folder ``local`` at a URL: ``kind`` s3 (uploaded to the module's moto server, dataset.json last, as
    make_shards uploads) or http (the Range HTTP server on a free loopback port). Yields the URL."""
    pytest.importorskip("fsspec")
    pytest.importorskip("aiohttp")
    if kind == "http":
        from facesiam.testing.servers import RangeServer

        with RangeServer(local) as server:
            yield server.url
        return
    from facesiam.data.remote import RemoteFolder

    request.getfixturevalue("s3")
    url = f"s3://faces/{uuid.uuid4().hex}"
    RemoteFolder(url).upload(local, last="dataset.json", overwrite=False, own=lambda name: True, progress=False)
    yield url
