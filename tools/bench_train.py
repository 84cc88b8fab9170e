"""Benchmark: training images/s of facesiam against the seed article's own training script, in one run.

    python tools/bench_train.py [--size 112] [--steps 30] [--data FACES_DIR]

Same model (tf_efficientnetv2_b0 + Linear 512), batch (32, m=4), input size, loss and data on the same machine.
The baseline is the article's loop, reproduced faithfully: torchvision ImageFolder + its transforms,
PML MPerClassSampler, DataLoader(num_workers=2), fp32, contiguous (NCHW) tensors, one process.
facesiam runs through facesiam.commands.train.main (shards, seeded per-sample augmentation, the configured memory
format and precision). Each side is timed over the same number of steps after warm-up; prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


class GpuUtilisation:
    """Mean GPU utilisation (%) while the block runs, from nvidia-smi polled every 0.5 s (None without a GPU)."""

    def __enter__(self):
        import shutil
        import subprocess
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        smi = shutil.which("nvidia-smi")

        def poll():
            while not self._stop.wait(0.5):
                try:
                    out = subprocess.run([smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                         capture_output=True, text=True, timeout=5).stdout.split()
                    self.samples.append(float(out[0]))
                except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                    return

        self._thread = threading.Thread(target=poll, daemon=True) if smi else None
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()

    @property
    def mean(self):
        return sum(self.samples) / len(self.samples) if self.samples else None


def seed_article_loop(faces: Path, size: int, steps: int, warmup: int) -> float:
    """The article's training loop (on CUDA when there is one: model.to(device), images.to(device)); returns
    steady-state images/s."""
    import timm
    import torch
    import torch.nn.functional as F
    import torchvision.transforms as T
    from pytorch_metric_learning import distances, losses, samplers
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    class SiameseNetwork(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = timm.create_model("tf_efficientnetv2_b0", pretrained=False, num_classes=0)
            self.fc = torch.nn.Linear(self.backbone.num_features, 512)

        def forward(self, x):
            return F.normalize(self.fc(self.backbone(x)), dim=1)

    transform = T.Compose([T.RandomHorizontalFlip(), T.RandomRotation(15), T.RandomResizedCrop(size, scale=(0.8, 1.0)),
                           T.ColorJitter(0.2, 0.2, 0.2), T.ToTensor(),
                           T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    dataset = ImageFolder(str(faces), transform=transform)
    sampler = samplers.MPerClassSampler(dataset.targets, m=4, batch_size=32, length_before_new_iter=len(dataset))
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, num_workers=2)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SiameseNetwork().to(device)
    loss_fn = losses.TripletMarginLoss(margin=0.1, distance=distances.CosineSimilarity())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    model.train()
    done, t0 = 0, None
    while done < steps + warmup:
        for images, labels in loader:
            if done == warmup:
                t0 = time.perf_counter()
            loss = loss_fn(model(images.to(device)), labels.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps + warmup:
                break
    loss.item()  # wait for the GPU's queued work
    return steps * 32 / (time.perf_counter() - t0)


def facesiam_loop(shards: Path, size: int, steps: int, warmup: int, extra: list[str]) -> tuple[float, float]:
    """facesiam training on the same data; steady-state images/s and the share of the step spent waiting for data,
    from its own step log."""
    from facesiam.commands.train import main

    with tempfile.TemporaryDirectory() as tmp:
        main(["--data", str(shards), "--output", tmp, "--config", str(Path(__file__).parents[1] / "launch/configs/seed.yaml"),
              "--image-size", str(size), "--max-steps", str(steps + warmup), "--log-every-steps", "1",
              "--val-split", "none", "--wandb", "off", "--tensorboard", "false", "--num-workers", "2", *extra])
        records = [json.loads(l) for l in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in records if "loss" in r][warmup:]
    times = [32 / r["images_per_s_per_process"] for r in steps_logged]
    wait = sum(r["data_wait_fraction"] * t for r, t in zip(steps_logged, times)) / sum(times)
    return len(times) * 32 / sum(times), wait


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--data", help="ImageFolder to use (default: 300 synthetic identities x 8 images)")
    p.add_argument("--facesiam-flags", action="append", default=None,
                   help="flags for facesiam's side (default: its CPU-fast settings, --channels-last true); repeat "
                        "to time several settings against the one baseline")
    args = p.parse_args(argv)
    import torch

    from facesiam.data import write_shards
    from facesiam.synthetic import make_synthetic_faces

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        faces = Path(args.data) if args.data else make_synthetic_faces(Path(tmp) / "faces", 300, 8, size=max(args.size, 112),
                                                                       seed=0, progress=False)
        shards = Path(tmp) / "shards"
        write_shards(faces, shards, progress=False)
        print(f"data: {faces} | input {args.size}px | batch 32 (m=4) | {args.steps} timed steps after {args.warmup} "
              f"warm-up | torch threads {torch.get_num_threads()}", flush=True)
        with GpuUtilisation() as util:
            base = seed_article_loop(faces, args.size, args.steps, args.warmup)
        print(f"seed article loop:  {base:7.1f} img/s{gpu_note(util)}", flush=True)
        for flags in args.facesiam_flags or ["--channels-last true"]:
            with GpuUtilisation() as util:
                ours, wait = facesiam_loop(shards, args.size, args.steps, args.warmup, flags.split())
            print(f"facesiam ({flags}): {ours:7.1f} img/s, {wait:.0%} of the step waiting for data{gpu_note(util)}; "
                  f"ratio facesiam / seed: {ours / base:.2f}x", flush=True)


def gpu_note(util: GpuUtilisation) -> str:
    return f", GPU utilisation {util.mean:.0f}% (nvidia-smi, whole run incl. warm-up)" if util.mean is not None else ""


if __name__ == "__main__":
    main(sys.argv[1:])
