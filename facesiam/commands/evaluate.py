"""facesiam evaluate: metrics.json, plots and report.md of a model or an embeddings file (1:1, 1:N, pairs).

    python tools/evaluate.py --embeddings emb.npz --out REPORT [--pairs pairs.txt] [--unenrolled 0.1]
    python tools/evaluate.py --checkpoint RUN/best --data DATA [--split val] [--flip] --out REPORT
    python tools/evaluate.py --checkpoint RUN/final --ijb IJBC --out REPORT   # IJB-C/IJB-B templates, 1:1 and 1:N
    python tools/evaluate.py --checkpoint RUN/final --bin lfw.bin,cfp_fp.bin --out REPORT  # insightface .bin sets
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
    p.add_argument("--ijb", metavar="DIR", help="an IJB-C or IJB-B folder (meta/, loose_crop/): its template 1:1 and "
                   "1:N protocols with --checkpoint, crop + mirror always (facesiam/eval/ijb.py; embeddings cached in --out, "
                   "resumable)")
    p.add_argument("--bin", metavar="LFW.BIN[,CFP_FP.BIN]", help="insightface .bin verification sets, comma-separated: "
                   "the field's 10-fold accuracy (image + mirror), AUC, TAR@FAR; with --checkpoint, --data optional "
                   "(facesiam/eval/verification_bin.py)")
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
    if args.ijb:
        return _evaluate_ijb(p, args, argv)
    if args.bin and not (args.data or args.embeddings):
        return _evaluate_bin(p, args, argv)
    if args.bin and args.embeddings:
        p.error("--bin embeds the .bin images with the model: pass --checkpoint RUN/final, not --embeddings")
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
        bins = _bin_sets(args, accelerator) if args.bin else None  # every process embeds its share of them too
        if metrics is None:  # not the main process: it embedded its share
            return None
        if bins:
            metrics["bin"] = bins
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


def _evaluate_ijb(p: argparse.ArgumentParser, args: argparse.Namespace, argv: Optional[Sequence[str]]) -> dict:
    """evaluate --checkpoint RUN/final --ijb DIR --out REPORT: IJB-B/IJB-C (metrics.json entry, report section)."""
    import os

    if not args.checkpoint or args.data or args.embeddings:
        p.error("--ijb takes a model: --checkpoint RUN/final (not --data or --embeddings)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.error("--ijb runs in one process: start it with python, not accelerate launch")
    from ..eval.ijb import run_checkpoint, summary

    command = " ".join(shlex.quote(a) for a in ["tools/evaluate.py", *(sys.argv[1:] if argv is None else argv)])
    result = run_checkpoint(args.checkpoint, args.ijb, args.out, batch_size=args.batch_size,
                            num_workers=args.num_workers, device=args.device, command=command)
    log.info("%s; wrote %s/metrics.json and report.md", summary(result), args.out)
    return result


def _bin_sets(args: argparse.Namespace, accelerator) -> Optional[dict]:
    """{name: metrics} of the --bin sets (None off the main process); each set's line is logged."""
    from ..eval.verification_bin import evaluate_bin_files

    return evaluate_bin_files(args.checkpoint, args.bin, batch_size=args.batch_size, num_workers=args.num_workers,
                              accelerator=accelerator, device=args.device)


def _evaluate_bin(p: argparse.ArgumentParser, args: argparse.Namespace,
                  argv: Optional[Sequence[str]]) -> Optional[dict]:
    """evaluate --checkpoint RUN/final --bin lfw.bin[,cfp_fp.bin] --out REPORT: the .bin sets alone."""
    if not args.checkpoint:
        p.error("--bin takes a model: --checkpoint RUN/final")
    from ..eval.embed import launched_accelerator
    from ..eval.report import log_to_wandb, write_report_dir
    from ..eval.verification_bin import bin_paths, bin_source

    t0 = time.time()
    bins = _bin_sets(args, launched_accelerator(cpu=args.device == "cpu"))
    if bins is None:  # not the main process: it embedded its share
        return None
    command = ["tools/evaluate.py", *(sys.argv[1:] if argv is None else argv)]
    source = {**bin_source(args.checkpoint, bin_paths(args.bin)), "command": " ".join(map(shlex.quote, command))}
    metrics = {"bin": bins, "source": source, "timing": {"bin": time.time() - t0}}
    figures = write_report_dir(metrics, args.out)
    log.info("wrote %s/metrics.json, report.md and %d plots (%.1fs)", args.out, len(figures), time.time() - t0)
    if args.wandb != "off":
        from pathlib import Path

        log_to_wandb(metrics, figures, args.wandb, args.wandb_project, name=Path(args.out).name)
    return metrics
