"""Benchmark: facesiam doctor at 100,000 photos -- does finding the problems cost at most 1.5x embedding them?

    python tools/bench_doctor.py [--photos 100000] [--identities 10000] [--sample 1000] [--checkpoint RUN/best]
                                 [--write-doc]

One run measures, on this machine:
  embedding   the doctor's own path (curate.photos.load_photos, no detection) over --sample synthetic 112 px photos
              with lfw_finetune.yaml's network (tf_efficientnet_lite0, 128-d; random weights unless --checkpoint:
              speed does not depend on them): photos/s of the network, and of the rest of that pass (file hashes,
              sharpness), each scaled to --photos
  checks      every check (thresholds from the data, exact 10-NN search, duplicates, wrong labels, merges) on
              --photos embeddings of --identities synthetic people (128-d, one byte copy per 1,000 photos), then
              findings.jsonl and the contact sheets, timed for real at full size
and prints the doctor's time over the embedding time. Face detection is left out of both sides: it costs the same
with or without the doctor (make_shards --align or align_faces does it once). --write-doc puts the section into
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HEADING = "## Data doctor: findings at 100,000 photos vs embedding them"


def embedding_rates(args, tmp: Path) -> tuple[float, float]:
    """(network photos/s, photos/s of the rest of the photo pass) over --sample photos."""
    import torch

    from facesiam.config import ModelConfig
    from facesiam.curate.photos import load_photos
    from facesiam.eval.embed import TorchEmbedder
    from facesiam.model import build_model, export_model
    from facesiam.synthetic import make_synthetic_faces

    checkpoint = args.checkpoint
    if checkpoint is None:
        torch.manual_seed(0)
        cfg = ModelConfig(backbone="tf_efficientnet_lite0", embedding_dim=128, image_size=112, pretrained="none")
        checkpoint = export_model(build_model(cfg), cfg, tmp / "model")
    per = 10
    faces = make_synthetic_faces(tmp / "faces", max(2, args.sample // per), per, size=112, seed=0, progress=False)
    embedder = TorchEmbedder(checkpoint, device="cpu")
    load_photos(faces, embedder, tmp / "work", detect=False, progress=False)  # warm-up: caches, allocator
    t0 = time.perf_counter()
    photos = load_photos(faces, embedder, tmp / "work", detect=False, progress=False)
    total = time.perf_counter() - t0
    embed = photos.meta["embed_seconds"]
    return len(photos) / embed, len(photos) / max(total - embed, 1e-9)


def synthetic_photos(n: int, identities: int, dim: int = 128, seed: int = 0):
    """Photos of ``identities`` people (genuine cosine ~0.7, impostor ~0), one byte copy per 1,000 photos."""
    from PIL import Image

    from facesiam.curate.photos import Photos

    rng = np.random.default_rng(seed)
    person = np.sort(rng.integers(0, identities, n))
    centres = rng.standard_normal((identities, dim)).astype(np.float32)
    e = centres[person] + 0.65 * rng.standard_normal((n, dim)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    files = [f"p{p:06d}/{i:07d}.jpg" for i, p in enumerate(person)]
    sha = [f"{i:064x}" for i in range(n)]
    for i in rng.choice(n, n // 1000, replace=False):  # byte copies across identities
        j = int(rng.integers(0, n))
        sha[j], e[j] = sha[i], e[i]
    records = [{"path": f, "output": f, "status": "aligned", "faces": 1, "score": 0.999, "skip": None} for f in files]
    tiles = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(64)]
    return Photos(Path("/synthetic"), files, [f.split("/")[0] for f in files], records, e, np.ones(n, bool),
                  np.full(n, 150.0), sha, lambda i: tiles[i % 64], crop_index=np.arange(n))


def check_seconds(args, tmp: Path) -> tuple[float, dict]:
    """Seconds of thresholds + checks + findings.jsonl + contact sheets at full size; finding counts."""
    from collections import Counter

    from facesiam.curate.checks import CheckSettings, run_checks
    from facesiam.curate.doctor import sheets_for, thresholds
    from facesiam.curate.findings import write_findings
    from facesiam.curate.sheets import write_sheets

    photos = synthetic_photos(args.photos, args.identities)
    t0 = time.perf_counter()
    values, _ = thresholds(photos)
    findings = run_checks(photos, CheckSettings(**values))
    write_findings(tmp / "report" / "findings.jsonl", findings)
    write_sheets(tmp / "report", "bench", [], sheets_for(findings, photos), photos.thumbnail)
    return time.perf_counter() - t0, dict(Counter(f.kind for f in findings))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--photos", type=int, default=100_000)
    p.add_argument("--identities", type=int, default=10_000)
    p.add_argument("--sample", type=int, default=1000, help="photos embedded to measure the embedding rate")
    p.add_argument("--checkpoint", help="an exported model to time instead of random weights")
    p.add_argument("--write-doc", action="store_true")
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        network, rest = embedding_rates(args, Path(tmp))
        checks, counts = check_seconds(args, Path(tmp))
    embed = args.photos / network
    doctor = embed + args.photos / rest + checks
    date = datetime.date.today().isoformat()
    lines = [HEADING, "",
             f"`python tools/bench_doctor.py --photos {args.photos} --identities {args.identities} --sample "
             f"{args.sample}` ({date}, {platform.processor() or platform.machine()}, this machine's 2 shared cores, "
             "CPU only).", "",
             "| stage | seconds at {:,} photos | how measured |".format(args.photos), "|---|---:|---|",
             f"| embedding (the network) | {embed:.0f} | {network:.0f} photos/s over {args.sample:,} photos, scaled |",
             f"| file hashes + sharpness | {args.photos / rest:.0f} | {rest:.0f} photos/s over the same photos, "
             "scaled |",
             f"| thresholds, 10-NN search, checks, findings.jsonl, contact sheets | {checks:.1f} | at full size |",
             f"| **doctor / embedding** | **{doctor / embed:.2f}x** | goal <= 1.5x |", "",
             "Findings on the synthetic people: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ".",
             "Face detection is outside both (done once by align_faces / make_shards --align, doctor or not)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_doc:
        from benchdoc import write_section

        write_section(HEADING, text)


if __name__ == "__main__":
    main()
