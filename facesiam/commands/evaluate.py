"""facesiam evaluate: metrics.json, plots and report.md of a model or an embeddings file (1:1, 1:N, pairs).

    python tools/evaluate.py --embeddings emb.npz --out REPORT [--pairs pairs.txt] [--unenrolled 0.1]
    python tools/evaluate.py --checkpoint RUN/best --data DATA [--split val] [--flip] --out REPORT
    accelerate launch tools/evaluate.py --checkpoint ... # embedding on every process, scoring on the main one

The protocols and metrics are described in facesiam/eval/pipeline.py and facesiam/eval/metrics.py.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from typing import Optional, Sequence

from . import command
from .common import add_model_arguments, log_to_stderr

log = logging.getLogger("facesiam.evaluate")


def _parse_unenrolled(text: Optional[str]):
    if text is None:
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("--unenrolled must be a count >= 1 or a fraction in (0, 1)")
    return value if value < 1 else int(value)


def _parser() -> argparse.ArgumentParser:
    from ..eval.verification import DEFAULT_BINS
    from ..eval.pipeline import PROTOCOLS

    p = argparse.ArgumentParser(prog="evaluate", description="1:1 verification, 1:N identification and pairs-file "
                                "metrics of a model or an embeddings file; writes metrics.json, plots, report.md.")
    p.add_argument("--embeddings", help="embeddings .npz from tools/embed.py (instead of --checkpoint/--data)")
    add_model_arguments(p, required=False)
    p.add_argument("--out", required=True, help="report directory (metrics.json, *.png, report.md)")
    p.add_argument("--pairs", help="LFW-format pairs file to evaluate as well")
    p.add_argument("--protocol", nargs="+", choices=PROTOCOLS, default=None,
                   help="protocols to run (default: verification identification, and pairs with --pairs)")
    p.add_argument("--unenrolled", type=_parse_unenrolled, default=None,
                   help="open-set 1:N: leave N identities (or a fraction F < 1) out of the gallery")
    p.add_argument("--bins", type=int, default=DEFAULT_BINS, help="verification histogram bins over [-1, 1]")
    p.add_argument("--device", default=None, help="cpu or cuda for scoring (default: cuda when available)")
    p.add_argument("--wandb", choices=("off", "offline", "online"), default="off",
                   help="also log to Weights & Biases (default off; online uploads metrics and plots, no images)")
    p.add_argument("--wandb-project", default="facesiam")
    return p


@command("evaluate")
def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    p = _parser()
    args = p.parse_args(argv)
    log_to_stderr()
    if bool(args.embeddings) == bool(args.checkpoint or args.data):
        p.error("pass either --embeddings NPZ or --checkpoint RUN/best with --data DATA")
    if bool(args.checkpoint) != bool(args.data):
        p.error("--checkpoint and --data go together")
    from ..eval.embed import launched_accelerator, load_embeddings
    from ..eval.pipeline import evaluate, evaluate_model
    from ..eval.report import fmt, log_to_wandb, write_report_dir

    t0 = time.time()
    options = dict(protocols=args.protocol, pairs_file=args.pairs, unenrolled=args.unenrolled, bins=args.bins,
                   progress=True)
    if args.embeddings:
        metrics = evaluate(load_embeddings(args.embeddings), device=args.device, **options)
    else:
        accelerator = launched_accelerator(cpu=args.device == "cpu")
        metrics = evaluate_model(args.checkpoint, args.data, split=args.split, flip=args.flip,
                                 batch_size=args.batch_size, num_workers=args.num_workers, accelerator=accelerator,
                                 device=args.device, align=args.align, **options)
        if metrics is None:  # not the main process: it embedded its share
            return None
    metrics["source"]["command"] = " ".join(shlex.quote(a) for a in ["tools/evaluate.py",
                                                                     *(sys.argv[1:] if argv is None else argv)])
    figures = write_report_dir(metrics, args.out)
    v, i = metrics.get("verification") or {}, metrics.get("identification") or {}
    summary = [f"{metrics['n_embeddings']:,} images of {metrics['n_identities']:,} identities"]
    if v.get("auc") is not None:
        summary.append(f"AUC {v['auc']:.4f}, EER {v['eer']:.4f}, TAR@FAR=1e-3 {fmt(v['tar_at_far']['1e-03'])}")
    if i.get("rank1") is not None:
        summary.append(f"rank-1 {i['rank1']:.4f}, MAP@R {fmt(i['map_at_r'])}")
    if metrics.get("pairs"):
        pr = metrics["pairs"]
        summary.append(f"pairs accuracy {pr['accuracy_mean']:.4f} ± {pr['accuracy_std']:.4f}")
    log.info("%s; wrote %s/metrics.json, report.md and %d plots (%.1fs)", "; ".join(summary), args.out,
             len(figures), time.time() - t0)
    if args.wandb != "off":
        from pathlib import Path

        log_to_wandb(metrics, figures, args.wandb, args.wandb_project, name=Path(args.out).name)
    return metrics
