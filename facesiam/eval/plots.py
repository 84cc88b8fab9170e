"""Evaluation figures (matplotlib, Agg): ROC, DET, precision-recall, genuine/impostor score histograms, CMC, per-fold accuracy.

Every function takes the metrics dict of facesiam.eval.metrics / metrics.json (the curves it needs are stored there)
and returns a Figure, so the same figure goes to a PNG, W&B or TensorBoard.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..fileio import atomic_write  # noqa: E402

log = logging.getLogger("facesiam.eval")


def _verification_sets(metrics: dict) -> list[tuple[str, dict]]:
    """(label, verification dict) for the all-pairs protocol, the pairs file and the .bin sets, whichever have
    curves."""
    sets = []
    if (metrics.get("verification") or {}).get("roc"):
        sets.append(("all pairs", metrics["verification"]))
    if (metrics.get("pairs") or {}).get("roc"):
        sets.append(("pairs file", metrics["pairs"]))
    sets += [(f"{name}.bin", m) for name, m in (metrics.get("bin") or {}).items() if m.get("roc")]
    return sets


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def roc_figure(metrics: dict) -> Figure:
    """TAR against FAR on a log axis, with the TAR@FAR operating points marked."""
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    sets = _verification_sets(metrics)
    for label, v in sets:
        far, tar = np.asarray(v["roc"]["far"]), np.asarray(v["roc"]["tar"])
        keep = far > 0
        auc = v.get("auc")
        ax.step(far[keep], tar[keep], where="post",
                label=f"{label} (AUC {auc:.4f})" if auc is not None else label)
        points = [(float(k), t) for k, t in (v.get("tar_at_far") or {}).items() if t is not None]
        if points:
            ax.plot(*zip(*points), "o", ms=4, color=ax.lines[-1].get_color())
    if not sets:
        _no_data(ax, "no genuine/impostor pairs")
    ax.set_xscale("log")
    smallest = [f for _, v in sets for f in v["roc"]["far"] if f > 0]
    ax.set_xlim(max(1e-7, min(smallest, default=1e-6)), 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title("ROC (1:1 verification)")
    ax.grid(True, which="both", alpha=0.3)
    if sets:
        ax.legend(loc="lower right")
    return fig


def pr_figure(metrics: dict) -> Figure:
    """Precision against recall (genuine = positive), from the stored ROC points and the pair counts."""
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    sets = _verification_sets(metrics)
    for label, v in sets:
        far, tar = np.asarray(v["roc"]["far"]), np.asarray(v["roc"]["tar"])
        # TP = TAR * genuine pairs, FP = FAR * impostor pairs: the ROC fixes the PR curve.
        tp, fp = tar * v["n_genuine"], far * v["n_impostor"]
        keep = tp + fp > 0
        ap = v.get("average_precision")
        ax.plot(tar[keep], tp[keep] / (tp[keep] + fp[keep]),
                label=f"{label} (AP {ap:.4f})" if ap is not None else label)
    if not sets:
        _no_data(ax, "no genuine/impostor pairs")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("recall (TAR)")
    ax.set_ylabel("precision")
    ax.set_title("precision-recall (1:1 verification)")
    ax.grid(True, alpha=0.3)
    if sets:
        ax.legend(loc="lower left")
    return fig


def det_figure(metrics: dict) -> Figure:
    """Detection error trade-off: FRR against FAR, both on log axes, with the EER marked."""
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    sets = _verification_sets(metrics)
    drawn = 0
    for label, v in sets:
        far, frr = np.asarray(v["roc"]["far"]), 1.0 - np.asarray(v["roc"]["tar"])
        keep = (far > 0) & (frr > 0)
        if not keep.any():  # perfectly separated: FRR is 0 wherever FAR > 0, nothing to show on log axes
            continue
        drawn += 1
        ax.plot(far[keep], frr[keep], label=f"{label} (EER {v['eer']:.4f})" if v.get("eer") is not None else label)
        if v.get("eer"):
            ax.plot([v["eer"]], [v["eer"]], "o", ms=4, color=ax.lines[-1].get_color())
    if not sets:
        _no_data(ax, "no genuine/impostor pairs")
    elif not drawn:
        _no_data(ax, "no error to plot: genuine and impostor scores are perfectly separated (EER 0)")
    if drawn:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("false reject rate (FRR)")
    ax.set_title("DET (1:1 verification)")
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(loc="upper right")
    return fig


def score_hist_figure(metrics: dict) -> Figure:
    """Genuine and impostor score densities with the EER, best-accuracy and FAR=1e-3 thresholds."""
    sets = _verification_sets(metrics)
    fig, axes = plt.subplots(1, max(1, len(sets)), figsize=(6 * max(1, len(sets)), 4), layout="constrained",
                             squeeze=False)
    if not sets:
        _no_data(axes[0, 0], "no genuine/impostor pairs")
    for ax, (label, v) in zip(axes[0], sets):
        h = v.get("score_histogram")
        if not h:
            _no_data(ax, "no histogram")
            continue
        edges = np.asarray(h["bin_edges"])
        width = np.diff(edges)
        for name, color in (("impostor", "tab:red"), ("genuine", "tab:green")):
            counts = np.asarray(h[name], dtype=float)
            density = counts / max(counts.sum(), 1) / width
            ax.stairs(density, edges, fill=True, alpha=0.4, color=color, label=name)
        for key, style, text in (("eer_threshold", "--", "EER"), ("best_threshold", ":", "best acc.")):
            if v.get(key) is not None:
                ax.axvline(v[key], color="k", ls=style, lw=1, label=f"{text} {v[key]:.3f}")
        t3 = (v.get("threshold_at_far") or {}).get("1e-03")
        if t3 is not None:
            ax.axvline(t3, color="tab:blue", ls="-.", lw=1, label=f"FAR=1e-3 {t3:.3f}")
        occupied = np.flatnonzero(np.asarray(h["genuine"]) + np.asarray(h["impostor"]))
        if len(occupied):
            ax.set_xlim(edges[occupied[0]] - 0.02, edges[occupied[-1] + 1] + 0.02)
        ax.set_xlabel("cosine similarity")
        ax.set_ylabel("density")
        ax.set_title(f"scores ({label})")
        ax.legend(fontsize=8)
    return fig


def cmc_figure(metrics: dict) -> Figure:
    """Cumulative match characteristic (closed-set identification rate by rank)."""
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    ident = metrics.get("identification") or {}
    cmc = ident.get("cmc")
    if cmc:
        ranks = np.arange(1, len(cmc) + 1)
        mated = ident.get("n_mated_probes", ident.get("n_probes"))
        ax.plot(ranks, cmc, "o-", ms=3, label=f"gallery {ident.get('gallery_size'):,}, mated probes {mated:,}")
        ax.set_xticks(ranks[::max(1, len(ranks) // 10)])
        ax.legend(loc="lower right")
    else:
        _no_data(ax, "no identification probes")
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate")
    ax.set_title("CMC (1:N identification)")
    ax.grid(True, alpha=0.3)
    return fig


def folds_figure(metrics: dict) -> Figure:
    """Held-out accuracy of each fold of the pairs protocol, with the mean."""
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    pairs = metrics.get("pairs") or {}
    folds = pairs.get("folds") or []
    if folds:
        acc = [f["accuracy"] for f in folds]
        ax.bar(np.arange(1, len(acc) + 1), acc, color="tab:blue", alpha=0.7)
        ax.axhline(pairs["accuracy_mean"], color="k", ls="--",
                   label=f"mean {pairs['accuracy_mean']:.4f} ± {pairs['accuracy_std']:.4f}")
        ax.set_ylim(max(0.0, min(acc) - 0.05), 1.0)
        ax.set_xticks(np.arange(1, len(acc) + 1))
        ax.legend(loc="lower right")
    else:
        _no_data(ax, "no pairs file")
    ax.set_xlabel("fold")
    ax.set_ylabel("accuracy")
    ax.set_title("pairs protocol: accuracy per held-out fold")
    return fig


FIGURES = {"roc": roc_figure, "det": det_figure, "pr": pr_figure, "score_hist": score_hist_figure,
           "cmc": cmc_figure, "pairs_folds": folds_figure}


def save_figures(metrics: dict, out_dir: str | Path, names: Optional[list[str]] = None) -> dict[str, Path]:
    """Write NAME.png for each figure that has data; returns {name: path}.

    A figure that cannot be drawn (for instance perfectly separated scores leave the log-log DET curve no point)
    is replaced by a labelled empty panel, or skipped with a warning if even that fails: figures never cost the
    numbers they illustrate.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in names or list(FIGURES):
        if name == "pairs_folds" and not (metrics.get("pairs") or {}).get("folds"):
            continue
        if name == "cmc" and not (metrics.get("identification") or {}).get("cmc"):
            continue
        if name in ("roc", "det", "pr", "score_hist") and not _verification_sets(metrics):
            continue
        path = out_dir / f"{name}.png"
        try:
            _save(FIGURES[name](metrics), path)
        except Exception as err:  # noqa: BLE001 -- any plotting failure: fall back, never lose the report
            log.warning("figure %s could not be drawn (%s: %s); writing an empty panel", name, type(err).__name__, err)
            try:
                _save(_placeholder(name, f"{name}: not drawn ({type(err).__name__})"), path)
            except Exception as err2:  # noqa: BLE001
                log.warning("figure %s skipped: %s", name, err2)
                continue
        written[name] = path
    return written


def _save(fig: Figure, path: Path) -> None:
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, dpi=120, format="png")
    finally:
        plt.close(fig)


def _placeholder(name: str, text: str) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    _no_data(ax, text)
    ax.set_axis_off()
    return fig
