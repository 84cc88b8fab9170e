"""An evaluation report directory: metrics.json (first: nothing computed is lost), figures, report.md; W&B.

    write_report_dir(metrics, "REPORT")   # REPORT/metrics.json, roc.png, det.png, pr.png, score_hist.png, cmc.png, report.md
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from ..fileio import write_json, write_text
from .identification import FPIR_TARGETS
from .neighbours import CMC_RANKS
from .verification import DEFAULT_BINS, FAR_TARGETS, far_key

log = logging.getLogger("facesiam.eval")


def write_report_dir(metrics: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write metrics.json, then every figure that can be drawn, then report.md; returns {figure name: path}.

    metrics.json comes first and each file is written atomically, so a figure that fails (it is skipped with a
    warning, see plots.save_figures) never costs the numbers.
    """
    from .plots import save_figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    figures = save_figures(metrics, out)
    write_report(metrics, out, figures)
    return figures


def fmt(value: Any, digits: int = 4) -> str:
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
              *([f"- images: {metrics['n_embeddings']:,}, identities: {metrics['n_identities']:,}"]
                if "n_embeddings" in metrics else []),  # absent: only .bin sets were evaluated
              f"- command: `{src.get('command', '')}`", ""]
    credit = src.get("data_credit")
    if credit:
        lines += [f"Data: {credit}", ""]

    v = metrics.get("verification")
    if v:
        lines += ["## 1:1 verification (all pairs)", "",
                  "Every unordered pair of two different images: genuine = same identity, impostor = different "
                  "identities; score = cosine similarity.", "",
                  "| genuine pairs | impostor pairs | AUC | AP | EER | EER threshold | best balanced accuracy | "
                  "threshold |", "|---|---|---|---|---|---|---|---|",
                  f"| {fmt(v['n_genuine'])} | {fmt(v['n_impostor'])} | {fmt(v['auc'], 5)} | "
                  f"{fmt(v.get('average_precision'), 5)} | {fmt(v['eer'])} | "
                  f"{fmt(v['eer_threshold'])} | {fmt(v['best_accuracy'])} | {fmt(v['best_threshold'])} |", "",
                  "| FAR | TAR | threshold |", "|---|---|---|"]
        for t in FAR_TARGETS:
            k = far_key(t)
            lines.append(f"| {k} | {fmt(v['tar_at_far'][k])} | {fmt((v.get('threshold_at_far') or {}).get(k))} |")
        lines += ["", "TAR@FAR is n/a when there are fewer than 1/FAR impostor pairs. "
                  f"Scores are counted in {v.get('bins', DEFAULT_BINS):,} bins over [-1, 1]; the metrics are exact "
                  "at the bin edges.", ""]
        for name, title in (("roc", "ROC"), ("det", "DET"), ("pr", "precision-recall"),
                            ("score_hist", "score distributions")):
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
        lines += [f"| {fmt(i['gallery_size'])} | {fmt(i['n_probes'])} | {fmt(i['rank1'])} | {fmt(i['rank5'])} | "
                  f"{fmt(at(10))} | {fmt(at(CMC_RANKS))} | {fmt(i['map_at_r'])} |", ""]
        if "fnir_at_fpir" in i:
            lines += ["| FPIR | FNIR (rank 1) | threshold |", "|---|---|---|"]
            for t in FPIR_TARGETS:
                k = far_key(t)
                lines.append(f"| {k} | {fmt(i['fnir_at_fpir'][k])} | {fmt(i['threshold_at_fpir'][k])} |")
            lines.append("")
        lines += ["MAP@R as in pytorch-metric-learning (every image queries all others).", ""]
        if "cmc" in figures:
            lines += ["![CMC](cmc.png)", ""]

    pr = metrics.get("pairs")
    if pr:
        lines += ["## Pairs protocol", "", f"`{pr['file']}`: {pr['n_same']:,} same and {pr['n_different']:,} "
                  f"different pairs in {len(pr['folds'])} folds; each fold's threshold is chosen on the other folds.",
                  "", "| accuracy | ± std | AUC | EER | TAR@FAR=1e-2 | TAR@FAR=1e-3 |", "|---|---|---|---|---|---|",
                  f"| {fmt(pr['accuracy_mean'])} | {fmt(pr['accuracy_std'])} | {fmt(pr['auc'], 5)} | "
                  f"{fmt(pr['eer'])} | {fmt(pr['tar_at_far']['1e-02'])} | {fmt(pr['tar_at_far']['1e-03'])} |", "",
                  "| fold | pairs | accuracy | threshold |", "|---|---|---|---|"]
        lines += [f"| {f['fold']} | {f['n_pairs']} | {fmt(f['accuracy'])} | {fmt(f['threshold'])} |"
                  for f in pr["folds"]]
        lines.append("")
        if "pairs_folds" in figures:
            lines += ["![accuracy per fold](pairs_folds.png)", ""]

    if metrics.get("bin"):
        from .verification_bin import bin_report_lines

        lines += bin_report_lines(metrics["bin"])
        if not v:  # no all-pairs section above: the curves are the sets' own
            lines += [f"![{name}]({figures[name].name})" for name in ("roc", "det", "pr", "score_hist")
                      if name in figures] + [""]

    timing = metrics.get("timing")
    if timing:
        lines += ["## Timing", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in timing.items()]
        lines.append("")
    text = "\n".join(lines) + "\n"
    write_html(out_dir / "report.html", "facesiam evaluation report", text)
    return write_text(out_dir / "report.md", text)


def write_html(path: str | os.PathLike, title: str, markdown_text: str) -> Path:
    """The same report as a web page (python-markdown, which tensorboard already brings); figures by relative path,
    so the page opens from the folder with nothing loaded from elsewhere."""
    import html

    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    style = ("body{font-family:system-ui,sans-serif;margin:1.5em;max-width:70em;color:#222}img{max-width:48%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em}")
    return write_text(path, f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
                            f"<style>{style}</style>\n{body}\n")


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
