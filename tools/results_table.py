"""Print a markdown table comparing training runs on held-out people (docs/results.md is made with it).

    python tools/results_table.py NAME=RUN_DIR:REPORT_DIR [NAME=RUN_DIR:REPORT_DIR ...]

Reads REPORT/metrics.json (tools/evaluate.py) and RUN/metrics.jsonl, config.yaml, summary.json of each run
(images seen and images/s per process: the runs in docs/results.md are single-process).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def row(name: str, run: Path, report: Path) -> str:
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
    images = summary["steps"] * batch
    tar = v["tar_at_far"]["1e-03"]
    tar_text = "-" if tar is None else f"{tar:.4f}"
    acc = p.get("accuracy_mean")
    acc_text = "-" if acc is None else f"{acc:.4f} ± {p['accuracy_std']:.4f}"
    return (f"| {name} | {images:,} | {v['auc']:.4f} | {v['eer']:.4f} | {tar_text} | {i['rank1']:.4f} | {acc_text} | "
            f"{seconds / 60:.1f} | {images / seconds:.1f} |")


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    print("| run | images seen | AUC | EER | TAR@FAR=1e-3 | rank-1 | 10-fold pairs accuracy | train min | images/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec in args:
        name, dirs = spec.rsplit("=", 1)
        run, report = dirs.split(":", 1)
        print(row(name, Path(run), Path(report)))


if __name__ == "__main__":
    main()
