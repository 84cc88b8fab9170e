"""Print a markdown table comparing training runs on held-out people (docs/results.md is made with it).

    python tools/results_table.py NAME=RUN_DIR:REPORT_DIR [NAME=RUN_DIR:REPORT_DIR ...] [--mean LABEL=NAME,NAME,...]
                                  [--compare "LABEL vs LABEL"]

--mean adds a row with the mean of the named runs (seeds of one recipe), right after the last of them: single
runs differ by more than most recipe changes at this size, so recipes are compared on means. --compare then
prints, per metric, the difference of two such means in standard errors with Welch's t-test (scipy; unequal
variances, since one recipe's seeds may spread more than the other's) and its two-sided p, with the rank-based
Mann-Whitney U test's two-sided p beside it (no normality assumed). It compares the table's five metrics, then TAR
at the other FARs, rank-5 and MAP@R where every report has them. --first-reach "A vs B" prints, for each run of
group A, the images at which its validation curve (RUN/metrics.jsonl) first reaches group B's mean final value:
how much budget recipe A needs to match recipe B.

Reads REPORT/metrics.json (tools/evaluate.py) and RUN/metrics.jsonl, config.yaml, summary.json of each run
(images seen and images/s per process: the runs in docs/results.md are single-process).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from scipy import stats

# (column, key, lower is better) of the metrics --compare tests: the table's five, then the ROC away from
# FAR=1e-3 and the rest of the identification numbers.
OTHER_FARS = ("1e-01", "1e-02", "1e-04")
COMPARED = (("AUC", "auc", False), ("EER", "eer", True), ("TAR@FAR=1e-3", "tar", False), ("rank-1", "rank1", False),
            ("pairs accuracy", "pairs", False),
            *((f"TAR@FAR={far.replace('-0', '-')}", f"tar_{far}", False) for far in OTHER_FARS),
            ("rank-5", "rank5", False), ("MAP@R", "map_at_r", False))
# (column, key, lower is better, key in the validation records of metrics.jsonl) of the metrics --first-reach follows.
REACHED = (("AUC", "auc", False, "val/auc"), ("EER", "eer", True, "val/eer"),
           ("TAR@FAR=1e-3", "tar", False, "val/tar_at_far_1e-03"), ("rank-1", "rank1", False, "val/rank1"))


def run_metrics(run: Path, report: Path) -> dict:
    """The table's numbers for one run: held-out metrics from the report, images and train time from the run."""
    for needed in (report / "metrics.json", run / "metrics.jsonl", run / "summary.json"):
        if not needed.is_file():
            raise SystemExit(f"{needed} not found: a finished run (launch/train.py) and its report "
                             "(tools/evaluate.py --out REPORT) are both needed")
    m = json.loads((report / "metrics.json").read_text())
    v, i, p = m["verification"], m["identification"], m.get("pairs", {})
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logs if "images_per_s" in r]
    summary = json.loads((run / "summary.json").read_text())
    c = yaml.safe_load((run / "config.yaml").read_text())
    batch = c["batch_size"] * c["grad_accum_steps"]
    prev, seconds = 0, 0.0
    for r in train:  # training wall time (validation excluded) from the logged throughput of each window
        seconds += (r["step"] - prev) * batch / max(r["images_per_s_per_process"], 1e-9)
        prev = r["step"]
    return {"images": summary["steps"] * batch, "auc": v["auc"], "eer": v["eer"], "tar": v["tar_at_far"]["1e-03"],
            "rank1": i["rank1"], "pairs": p.get("accuracy_mean"), "pairs_std": p.get("accuracy_std"),
            "seconds": seconds, **{f"tar_{far}": v["tar_at_far"].get(far) for far in OTHER_FARS},
            "rank5": i.get("rank5"), "map_at_r": i.get("map_at_r"),
            "curve": [(r["step"] * batch, r) for r in logs if "val/auc" in r]}


def _num(x, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def row(name: str, r: dict) -> str:
    pairs = "-" if r["pairs"] is None else (f"{r['pairs']:.4f}" if r["pairs_std"] is None
                                            else f"{r['pairs']:.4f} ± {r['pairs_std']:.4f}")
    return (f"| {name} | {round(r['images']):,} | {_num(r['auc'])} | {_num(r['eer'])} | {_num(r['tar'])} | "
            f"{_num(r['rank1'])} | {pairs} | {r['seconds'] / 60:.1f} | {r['images'] / r['seconds']:.1f} |")


def _mean(runs: list[dict], key: str) -> float | None:
    """Mean of one metric over runs; None when a run lacks it (e.g. no pairs file)."""
    values = [r[key] for r in runs]
    return None if any(x is None for x in values) else sum(values) / len(values)


def mean_row(label: str, runs: list[dict]) -> str:
    keys = ("images", "auc", "eer", "tar", "rank1", "pairs", "seconds")
    return row(f"*{label}, mean of {len(runs)}*", {**{k: _mean(runs, k) for k in keys}, "pairs_std": None})


def compare_rows(label_a: str, runs_a: list[dict], label_b: str, runs_b: list[dict]) -> list[str]:
    """Markdown table: each metric's two means, the difference in standard errors (Welch's t), its two-sided p and
    the two-sided p of the Mann-Whitney U test."""
    lines = [f"| metric | {label_a} (n={len(runs_a)}) | {label_b} (n={len(runs_b)}) | better | t (SE) | p "
             "| p (Mann-Whitney) |", "|---|---:|---:|---|---:|---:|---:|"]
    for column, key, lower_is_better in COMPARED:
        mean_a, mean_b = _mean(runs_a, key), _mean(runs_b, key)
        if mean_a is None or mean_b is None:
            continue
        a, b = [r[key] for r in runs_a], [r[key] for r in runs_b]
        t, p = stats.ttest_ind(a, b, equal_var=False)
        p_rank = stats.mannwhitneyu(a, b, alternative="two-sided").pvalue
        better = label_a if (mean_a < mean_b) == lower_is_better else label_b
        lines.append(f"| {column} | {mean_a:.4f} | {mean_b:.4f} | {better} | {abs(t):.1f} | {p:.3f} | {p_rank:.3f} |")
    return lines


def first_reach_rows(names_a: list[str], runs_a: list[dict], label_b: str, runs_b: list[dict]) -> list[str]:
    """Markdown table: per run of A and metric, the first validation point at least as good as B's mean."""
    targets = [(column, val_key, lower, _mean(runs_b, key)) for column, key, lower, val_key in REACHED]
    lines = [f"| images at which the run first reaches {label_b}'s mean | "
             + " | ".join(f"{column} {target:.4f}" for column, _, _, target in targets) + " |",
             "|---|" + "---|" * len(targets)]
    for name, run in zip(names_a, runs_a):
        cells = []
        for _, val_key, lower, target in targets:
            points = [(images, r[val_key]) for images, r in run["curve"] if r.get(val_key) is not None]
            hit = next(((i, x) for i, x in points if (x <= target if lower else x >= target)), None)
            cells.append("not reached" if hit is None else f"{hit[0]:,} ({hit[1]:.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR:REPORT_DIR")
    parser.add_argument("--mean", action="append", default=[], metavar="LABEL=NAME,NAME,...",
                        help="add a row with the mean of these runs (repeatable)")
    parser.add_argument("--compare", action="append", default=[], metavar="LABEL vs LABEL",
                        help="Welch's t-test (and Mann-Whitney U) between two --mean groups, per metric (repeatable)")
    parser.add_argument("--first-reach", action="append", default=[], metavar="LABEL vs LABEL",
                        help="where each run of the first --mean group first reaches the second's mean (repeatable)")
    args = parser.parse_args(argv)
    results: dict[str, dict] = {}
    for spec in args.runs:
        name, sep, dirs = spec.partition("=")
        run, sep2, report = dirs.partition(":")
        if not (sep and sep2):
            parser.error(f"{spec!r}: write each run as NAME=RUN_DIR:REPORT_DIR")
        results[name] = run_metrics(Path(run), Path(report))
    groups: dict[str, list[dict]] = {}
    members_of: dict[str, list[str]] = {}
    means_after: dict[str, list[str]] = {}  # a mean row goes right after the last of its runs in the table
    position = {name: i for i, name in enumerate(results)}
    for spec in args.mean:
        label, _, names = spec.rpartition("=")  # a label may hold "=" (m=4), run names do not
        members = names.split(",")
        missing = [n for n in members if n not in results]
        if missing:
            parser.error(f"--mean {spec!r}: no run named {', '.join(missing)} among the positional runs")
        groups[label], members_of[label] = [results[n] for n in members], members
        means_after.setdefault(max(members, key=position.__getitem__), []).append(label)

    def two_groups(option: str, spec: str) -> tuple[str, str]:
        label_a, sep, label_b = spec.partition(" vs ")
        if not sep or label_a not in groups or label_b not in groups:
            parser.error(f"{option} {spec!r}: write \"LABEL vs LABEL\" with two labels given to --mean "
                         f"(these are: {', '.join(groups) or 'none'})")
        return label_a, label_b

    # Checked before anything is printed, so a typo does not leave half a table.
    comparisons = [two_groups("--compare", spec) for spec in args.compare]
    for spec, (label_a, label_b) in zip(args.compare, comparisons):
        if min(len(groups[label_a]), len(groups[label_b])) < 2:
            parser.error(f"--compare {spec!r}: each side needs at least 2 runs for a standard error")
    reaches = [two_groups("--first-reach", spec) for spec in args.first_reach]
    print("| run | images seen | AUC | EER | TAR@FAR=1e-3 | rank-1 | 10-fold pairs accuracy | train min | images/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(row(name, r))
        for label in means_after.get(name, []):
            print(mean_row(label, groups[label]))
    for label_a, label_b in comparisons:
        print()
        print("\n".join(compare_rows(label_a, groups[label_a], label_b, groups[label_b])))
    for label_a, label_b in reaches:
        print()
        print("\n".join(first_reach_rows(members_of[label_a], groups[label_a], label_b, groups[label_b])))


if __name__ == "__main__":
    main()
