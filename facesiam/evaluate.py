"""Evaluate a model or an embeddings file: metrics.json, plots and report.md (1:1, 1:N, LFW-style pairs).

    python tools/evaluate.py --embeddings emb.npz --out REPORT [--pairs pairs.txt] [--unenrolled 0.1]
    python tools/evaluate.py --checkpoint RUN/best --data DATA [--split val] [--flip] --out REPORT
    accelerate launch tools/evaluate.py --checkpoint ... # embedding on every process, scoring on the main one

Protocols (``--protocol``, default: verification and identification, plus pairs when --pairs is given):
verification = every genuine and impostor pair of distinct images (AUC, EER, TAR@FAR 1e-1..1e-6);
identification = closed set (gallery: first image in path order of each identity with >= 2 images, probes: the
rest; rank-1/5, CMC, MAP@R), open set with --unenrolled (FNIR@FPIR); pairs = an LFW-format pairs file (10-fold
accuracy with the threshold chosen on the other folds, AUC, TAR@FAR). See facesiam.metrics for the method.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

from .cli import one_line_errors
from .metrics import CMC_RANKS, DEFAULT_BINS, FAR_TARGETS, FPIR_TARGETS, evaluate_embeddings, far_key

log = logging.getLogger("facesiam.evaluate")

PROTOCOLS = ("verification", "identification", "pairs")

# Credits for the shared real-face data sets: a report with numbers on them must cite them.
DATA_CREDITS = {
    "lfw": "Labeled Faces in the Wild: G. B. Huang, M. Ramesh, T. Berg, E. Learned-Miller, UMass Amherst TR 07-49, "
           "2007 (deep-funneled images: Huang, Mattar, Lee, Learned-Miller, NIPS 2012). For research benchmarking.",
    "orl": "The ORL (AT&T) face database, Olivetti Research Laboratory, Cambridge (F. Samaria, A. Harter, "
           "IEEE WACV 1994).",
    "yale": "The Yale Face Database (Belhumeur, Hespanha, Kriegman, 1997).",
}


def _parse_unenrolled(text: Optional[str]):
    if text is None:
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("--unenrolled must be a count >= 1 or a fraction in (0, 1)")
    return value if value < 1 else int(value)


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_report(metrics: dict, out_dir: str | os.PathLike, figures: dict[str, Path]) -> Path:
    """REPORT/report.md: what was evaluated, and tables of every metric, with the figures."""
    out_dir = Path(out_dir)
    src = metrics.get("source", {})
    lines = ["# facesiam evaluation report", ""]
    lines += [f"- date: {src.get('date', '')}",
              f"- data: `{src.get('data', 'n/a')}`" + (f" (split `{src['split']}`)" if src.get("split") else ""),
              f"- model: `{src.get('checkpoint', 'n/a')}`" + (f" ({src['backbone']}, {src.get('embedding_dim')}-d)"
                                                           if src.get("backbone") else ""),
              f"- embeddings: `{src.get('embeddings') or 'computed for this report'}`"
              + (", with horizontal-flip averaging" if src.get("flip") else ""),
              f"- images: {metrics['n_embeddings']:,}, identities: {metrics['n_identities']:,}",
              f"- command: `{src.get('command', '')}`", ""]
    credit = src.get("data_credit")
    if credit:
        lines += [f"Data: {credit}", ""]

    v = metrics.get("verification")
    if v:
        lines += ["## 1:1 verification (all pairs)", "",
                  "Every unordered pair of two different images: genuine = same identity, impostor = different "
                  "identities; score = cosine similarity.", "",
                  "| genuine pairs | impostor pairs | AUC | EER | EER threshold | best balanced accuracy | "
                  "threshold |", "|---|---|---|---|---|---|---|",
                  f"| {_fmt(v['n_genuine'])} | {_fmt(v['n_impostor'])} | {_fmt(v['auc'], 5)} | {_fmt(v['eer'])} | "
                  f"{_fmt(v['eer_threshold'])} | {_fmt(v['best_accuracy'])} | {_fmt(v['best_threshold'])} |", "",
                  "| FAR | TAR | threshold |", "|---|---|---|"]
        for t in FAR_TARGETS:
            k = far_key(t)
            lines.append(f"| {k} | {_fmt(v['tar_at_far'][k])} | {_fmt((v.get('threshold_at_far') or {}).get(k))} |")
        lines += ["", "TAR@FAR is n/a when there are fewer than 1/FAR impostor pairs. "
                  f"Scores are counted in {v.get('bins', DEFAULT_BINS):,} bins over [-1, 1]; the metrics are exact "
                  "at the bin edges.", ""]
        for name, title in (("roc", "ROC"), ("det", "DET"), ("score_hist", "score distributions")):
            if name in figures:
                lines.append(f"![{title}]({figures[name].name})")
        lines.append("")

    i = metrics.get("identification")
    if i:
        lines += ["## 1:N identification", "",
                  "Gallery: the first image (path order) of each identity with at least 2 images; probes: the "
                  "others" + (f"; {i['unenrolled_identities']} identities left out of the gallery (open set), "
                              f"their {i['n_nonmated_probes']:,} images are non-mated probes" if
                              i.get("unenrolled_identities") else "") + ".", "",
                  "| gallery | probes | rank-1 | rank-5 | rank-10 | rank-20 | MAP@R |", "|---|---|---|---|---|---|---|"]
        cmc = i.get("cmc") or []
        at = lambda r: cmc[r - 1] if len(cmc) >= r else None  # noqa: E731
        lines += [f"| {_fmt(i['gallery_size'])} | {_fmt(i['n_probes'])} | {_fmt(i['rank1'])} | {_fmt(i['rank5'])} | "
                  f"{_fmt(at(10))} | {_fmt(at(CMC_RANKS))} | {_fmt(i['map_at_r'])} |", ""]
        if "fnir_at_fpir" in i:
            lines += ["| FPIR | FNIR (rank 1) | threshold |", "|---|---|---|"]
            for t in FPIR_TARGETS:
                k = far_key(t)
                lines.append(f"| {k} | {_fmt(i['fnir_at_fpir'][k])} | {_fmt(i['threshold_at_fpir'][k])} |")
            lines.append("")
        lines += ["MAP@R as in pytorch-metric-learning (every image queries all others).", ""]
        if "cmc" in figures:
            lines += ["![CMC](cmc.png)", ""]

    pr = metrics.get("pairs")
    if pr:
        lines += ["## Pairs protocol", "", f"`{pr['file']}`: {pr['n_same']:,} same and {pr['n_different']:,} "
                  f"different pairs in {len(pr['folds'])} folds; each fold's threshold is chosen on the other folds.",
                  "", "| accuracy | ± std | AUC | EER | TAR@FAR=1e-2 | TAR@FAR=1e-3 |", "|---|---|---|---|---|---|",
                  f"| {_fmt(pr['accuracy_mean'])} | {_fmt(pr['accuracy_std'])} | {_fmt(pr['auc'], 5)} | "
                  f"{_fmt(pr['eer'])} | {_fmt(pr['tar_at_far']['1e-02'])} | {_fmt(pr['tar_at_far']['1e-03'])} |", "",
                  "| fold | pairs | accuracy | threshold |", "|---|---|---|---|"]
        lines += [f"| {f['fold']} | {f['n_pairs']} | {_fmt(f['accuracy'])} | {_fmt(f['threshold'])} |"
                  for f in pr["folds"]]
        lines.append("")
        if "pairs_folds" in figures:
            lines += ["![accuracy per fold](pairs_folds.png)", ""]

    timing = metrics.get("timing")
    if timing:
        lines += ["## Timing", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in timing.items()]
        lines.append("")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if k in ("roc", "score_histogram", "cmc", "folds", "source", "timing"):
            continue
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def log_to_wandb(metrics: dict, figures: dict[str, Path], mode: str, project: str = "facesiam",
                 name: Optional[str] = None) -> None:
    """Log the scalar metrics and the figures to Weights & Biases (imported only here)."""
    import wandb

    run = wandb.init(project=project, name=name, mode=mode, job_type="evaluate", config=metrics.get("source", {}))
    try:
        run.log({**{f"eval/{k}": v for k, v in _flat(metrics).items()},
                 **{f"eval/{k}": wandb.Image(str(p)) for k, p in figures.items()}})
        if (metrics.get("identification") or {}).get("cmc"):
            table = wandb.Table(data=[[r + 1, c] for r, c in enumerate(metrics["identification"]["cmc"])],
                                columns=["rank", "identification_rate"])
            run.log({"eval/cmc_table": table})
    finally:
        run.finish()


def _data_credit(data: Optional[str]) -> Optional[str]:
    if not data:
        return None
    name = Path(data).name.lower()
    return next((text for key, text in DATA_CREDITS.items() if name.startswith(key)), None)


def _main(argv: Optional[Sequence[str]] = None) -> None:
    from .embed import add_model_arguments

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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    protocols = args.protocol or (["verification", "identification"] + (["pairs"] if args.pairs else []))
    if "pairs" in protocols and not args.pairs:
        raise SystemExit("evaluate: --protocol pairs needs --pairs PAIRS_FILE")
    if bool(args.embeddings) == bool(args.checkpoint or args.data):
        raise SystemExit("evaluate: pass either --embeddings NPZ or --checkpoint RUN/best with --data DATA")
    if args.checkpoint and not args.data or args.data and not args.checkpoint:
        raise SystemExit("evaluate: --checkpoint and --data go together")

    from .embed import embed_path, launched_accelerator, load_embeddings

    timing = {}
    t0 = time.time()
    if args.embeddings:
        data = load_embeddings(args.embeddings)
        main_process = True
    else:
        accelerator = launched_accelerator(cpu=args.device == "cpu")
        data = embed_path(args.checkpoint, args.data, split=args.split, flip=args.flip, batch_size=args.batch_size,
                          num_workers=args.num_workers, accelerator=accelerator, device=args.device)
        main_process = accelerator is None or accelerator.is_main_process
        timing["embed"] = time.time() - t0
    if not main_process:
        return

    meta = data.get("meta", {})
    source = {"date": datetime.now().astimezone().isoformat(timespec="seconds"),
              "embeddings": args.embeddings, "checkpoint": args.checkpoint or meta.get("checkpoint"),
              "data": args.data or meta.get("data"), "split": args.split if args.data else meta.get("split"),
              "flip": args.flip if args.data else meta.get("flip", False), "backbone": meta.get("backbone"),
              "embedding_dim": int(data["embeddings"].shape[1]) if data["embeddings"].ndim == 2 else None,
              "command": " ".join(shlex.quote(a) for a in ["tools/evaluate.py", *(sys.argv[1:] if argv is None
                                                                                    else argv)])}
    source["data_credit"] = _data_credit(source["data"])
    t1 = time.time()
    metrics = evaluate_embeddings(data["embeddings"], data["labels"], data["paths"], unenrolled=args.unenrolled,
                                  device=args.device, progress=True, bins=args.bins,
                                  protocols=[x for x in protocols if x != "pairs"])
    timing["score"] = time.time() - t1
    if "pairs" in protocols:
        from .pairs import evaluate_pairs_file

        t2 = time.time()
        metrics["pairs"] = evaluate_pairs_file(args.pairs, data["embeddings"], data["paths"], data["labels"],
                                               data["classes"])
        timing["pairs"] = time.time() - t2
    metrics["source"] = source
    metrics["timing"] = timing

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from .plots import save_figures

    figures = save_figures(metrics, out)
    _write_json(out / "metrics.json", metrics)
    write_report(metrics, out, figures)
    v, i = metrics.get("verification") or {}, metrics.get("identification") or {}
    summary = [f"{metrics['n_embeddings']:,} images of {metrics['n_identities']:,} identities"]
    if v.get("auc") is not None:
        summary.append(f"AUC {v['auc']:.4f}, EER {v['eer']:.4f}, TAR@FAR=1e-3 {_fmt(v['tar_at_far']['1e-03'])}")
    if i.get("rank1") is not None:
        summary.append(f"rank-1 {i['rank1']:.4f}, MAP@R {_fmt(i['map_at_r'])}")
    if metrics.get("pairs"):
        pr = metrics["pairs"]
        summary.append(f"pairs accuracy {pr['accuracy_mean']:.4f} ± {pr['accuracy_std']:.4f}")
    log.info("%s; wrote %s/metrics.json, report.md and %d plots (%.1fs)", "; ".join(summary), out, len(figures),
             time.time() - t0)
    if args.wandb != "off":
        log_to_wandb(metrics, figures, args.wandb, args.wandb_project, name=out.name)


main = one_line_errors("evaluate", _main)


if __name__ == "__main__":
    main()
