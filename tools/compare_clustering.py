"""Compare facesiam cluster's methods on embeddings whose identities are known (docs/curate.md is made with it).

    python tools/embed.py --checkpoint RUN/best --data SHARDS --split val --out val.npz
    python tools/compare_clustering.py val.npz --threshold 0.6277 [--thresholds 0.55,0.6,0.65,0.7]

Prints one markdown row per method (facesiam.curate.cluster.METHODS) at the model's same-person threshold: BCubed
and pairwise precision/recall/F, clusters, unsure photos and seconds; --thresholds adds a sweep of BCubed F per
method. Rows with a zero embedding (no face found, e.g. by a teacher) are left out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> dict:
    from facesiam.curate.cluster import METHODS, UNSURE, cluster_embeddings, cluster_scores
    from facesiam.eval.embed import load_embeddings

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("embeddings", help=".npz from tools/embed.py (labels = the true identities)")
    p.add_argument("--threshold", type=float, required=True, help="the model's same-person threshold")
    p.add_argument("--thresholds", help="comma-separated thresholds for a BCubed F sweep")
    p.add_argument("--min-size", type=int, default=2)
    args = p.parse_args(argv)
    data = load_embeddings(args.embeddings)
    e, labels = data["embeddings"], data["labels"]
    keep = np.linalg.norm(e, axis=1) > 0
    e, labels = e[keep] / np.linalg.norm(e[keep], axis=1, keepdims=True), labels[keep].tolist()
    print(f"{len(labels)} photos of {len(set(labels))} people; threshold {args.threshold}")
    print("| method | BCubed F | BCubed P | BCubed R | pairwise P | pairwise R | clusters | unsure | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    out = {}
    for method in METHODS:
        t0 = time.perf_counter()
        clusters = cluster_embeddings(e, args.threshold, method, args.min_size)
        seconds = time.perf_counter() - t0
        s = cluster_scores(clusters, labels)
        out[method] = s
        print(f"| {method} | {s['bcubed_f']:.4f} | {s['bcubed_precision']:.4f} | {s['bcubed_recall']:.4f} | "
              f"{s['pairwise_precision']:.4f} | {s['pairwise_recall']:.4f} | {int(clusters.max(initial=-1)) + 1} | "
              f"{int((clusters == UNSURE).sum())} | {seconds:.2f} |")
    if args.thresholds:
        values = [float(v) for v in args.thresholds.split(",")]
        print("\n| BCubed F at threshold | " + " | ".join(f"{v:g}" for v in values) + " |")
        print("|---|" + "---:|" * len(values))
        for method in METHODS:
            if method == "hdbscan":  # uses no threshold
                continue
            row = [cluster_scores(cluster_embeddings(e, v, method, args.min_size), labels)["bcubed_f"] for v in values]
            print(f"| {method} | " + " | ".join(f"{f:.4f}" for f in row) + " |")
    return out


if __name__ == "__main__":
    main()
