"""The whole path on built-in data, in a few CPU minutes: synthetic faces -> shards -> training -> evaluation report.

    facesiam demo --out demo            # or: python -m facesiam.demo --out demo

Each stage is the same library call as its command-line tool, so this is also a worked example of the API.
Stages whose output already exists are reused (delete OUT to start over); the training resumes if interrupted.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

# The demo recipe: small faces and a short schedule so it finishes in minutes on 2 CPU cores, with the loss,
# head and optimizer of facesiam's recommended recipe (see launch/configs/ and docs/results.md).
DEMO_TRAIN_FLAGS = [
    "--backbone", "tf_efficientnetv2_b0", "--image-size", "64", "--channels-last", "true",
    "--head", "face", "--loss", "arcface", "--margin", "15", "--scale", "24", "--class-lr-mult", "10",
    "--optimizer", "adamw", "--lr", "2e-3", "--weight-decay", "5e-4", "--scheduler", "cosine", "--warmup-steps", "20",
    "--batch-size", "64", "--m-per-class", "4", "--epochs", "100", "--num-workers", "2",
    "--log-every-steps", "20", "--wandb", "off",
]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="facesiam demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo", help="working directory (default: %(default)s)")
    p.add_argument("--identities", type=int, default=300, help="synthetic identities (default: %(default)s)")
    p.add_argument("--images-per-identity", type=int, default=10)
    p.add_argument("--val-identities", type=float, default=60, help="held-out identities (count or fraction)")
    p.add_argument("--max-steps", type=int, default=300, help="training steps of 64 images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from .data import make_synthetic_faces, write_shards
    from .evaluate import main as evaluate_main
    from .pairs import main as make_pairs_main
    from .train import main as train_main

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    faces, shards, run, report = out / "faces", out / "shards", out / "run", out / "report"
    t0 = time.time()

    print(f"[1/5] synthetic faces -> {faces}", flush=True)
    if not (faces / "synthetic.json").exists():
        make_synthetic_faces(faces, args.identities, args.images_per_identity, size=64, seed=args.seed, overwrite=True)
    print(f"[2/5] shards (held-out identities for validation) -> {shards}", flush=True)
    if not (shards / "dataset.json").exists():
        val = int(args.val_identities) if args.val_identities >= 1 else args.val_identities
        write_shards(faces, shards, val_identities=val, seed=args.seed, overwrite=True)
    print(f"[3/5] training -> {run}", flush=True)
    summary = train_main(["--data", str(shards), "--output", str(run), *DEMO_TRAIN_FLAGS,
                          "--max-steps", str(args.max_steps), "--val-every-steps", str(max(50, args.max_steps // 3)),
                          "--seed", str(args.seed), "--resume", "latest"])
    print(f"[4/5] LFW-style pairs file for the held-out people -> {out / 'pairs.txt'}", flush=True)
    make_pairs_main([str(shards), "--split", "val", "--out", str(out / "pairs.txt"), "--pairs-per-fold", "100",
                     "--seed", str(args.seed)])
    print(f"[5/5] evaluation on people never seen in training -> {report}", flush=True)
    evaluate_main(["--checkpoint", str(run / "best"), "--data", str(shards), "--split", "val",
                   "--pairs", str(out / "pairs.txt"), "--out", str(report)])
    minutes = (time.time() - t0) / 60
    print(f"\ndone in {minutes:.1f} min. Look at:\n"
          f"  {report / 'report.md'}      metrics tables (1:1 verification, 1:N identification, 10-fold pairs)\n"
          f"  {report}/*.png          ROC, DET, score histograms, CMC\n"
          f"  {run / 'best'}              the exported model (model.safetensors + config.json)\n"
          f"  {run / 'metrics.jsonl'}     training log; TensorBoard: tensorboard --logdir {run / 'tensorboard'}\n"
          f"Try: facesiam compare --checkpoint {run / 'best'} IMG1 IMG2 --report {report / 'metrics.json'}")
    return summary


if __name__ == "__main__":
    main()
