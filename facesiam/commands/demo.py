"""The whole path on built-in data, in a few CPU minutes: synthetic faces -> shards -> training -> evaluation report.

    facesiam demo --out demo            # or: python -m facesiam.commands.demo --out demo

Each stage is the same library call as its command-line tool, so this is also a worked example of the API.
Stages whose output already exists are reused (delete OUT to start over); the training resumes if interrupted.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

from . import command

# The demo recipe: small faces and a short schedule so it finishes in minutes on 2 CPU cores, with the loss,
# head and optimizer of facesiam's recommended recipe (see launch/configs/ and docs/results.md).
DEMO_RECIPE = {
    "model": {"backbone": "tf_efficientnetv2_b0", "image_size": 64, "head": "face"},
    "loss": {"loss": "arcface", "margin": 15, "scale": 24, "class_lr_mult": 10},
    "optim": {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 5e-4, "scheduler": "cosine", "warmup_steps": 20},
    "channels_last": True, "batch_size": 64, "m_per_class": 4, "epochs": 100, "num_workers": 2,
    "log_every_steps": 20, "wandb": "off",
}


@command("demo")
def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="facesiam demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo", help="working directory (default: %(default)s)")
    p.add_argument("--identities", type=int, default=300, help="synthetic identities (default: %(default)s)")
    p.add_argument("--images-per-identity", type=int, default=10)
    p.add_argument("--val-identities", type=float, default=60, help="held-out identities (count or fraction)")
    p.add_argument("--max-steps", type=int, default=300, help="training steps of 64 images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import numpy as np

    from ..config import config_from_dict
    from ..data import open_dataset, write_shards
    from ..synthetic import make_synthetic_faces
    from ..eval.pairs import make_pairs, write_pairs
    from ..eval.pipeline import evaluate_model
    from ..eval.report import write_report_dir
    from ..training import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    faces, shards, run, report, pairs = out / "faces", out / "shards", out / "run", out / "report", out / "pairs.txt"
    t0 = time.time()

    print(f"[1/5] synthetic faces -> {faces}", flush=True)
    if not (faces / "synthetic.json").exists():
        make_synthetic_faces(faces, args.identities, args.images_per_identity, size=64, seed=args.seed, overwrite=True)
    print(f"[2/5] shards (held-out identities for validation) -> {shards}", flush=True)
    if not (shards / "dataset.json").exists():
        val = int(args.val_identities) if args.val_identities >= 1 else args.val_identities
        write_shards(faces, shards, val_identities=val, seed=args.seed, overwrite=True)
    print(f"[3/5] training -> {run}", flush=True)
    cfg = config_from_dict({**DEMO_RECIPE, "data": str(shards), "output": str(run), "max_steps": args.max_steps,
                            "val_every_steps": max(50, args.max_steps // 3), "seed": args.seed, "resume": "latest"})
    summary = train(cfg)
    print(f"[4/5] LFW-style pairs file for the held-out people -> {pairs}", flush=True)
    held_out = open_dataset(shards, split="val")
    # 10 folds of up to 100 same + 100 different pairs (LFW's View 2 has 300); fewer when a small demo's held-out
    # people do not have that many distinct same-identity pairs.
    per_class = np.bincount(np.asarray(held_out.labels))
    pairs_per_fold = int(max(1, min(100, (per_class * (per_class - 1) // 2).sum() // 10)))
    write_pairs(make_pairs(held_out.paths, held_out.labels, held_out.classes, pairs_per_fold=pairs_per_fold,
                           seed=args.seed), pairs)
    print(f"[5/5] evaluation on people never seen in training -> {report}", flush=True)
    metrics = evaluate_model(str(run / "best"), str(shards), split="val", pairs_file=str(pairs), progress=True)
    write_report_dir(metrics, report)
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
