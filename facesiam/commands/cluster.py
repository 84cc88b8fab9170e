"""facesiam cluster: sort unlabelled photos into one folder per proposed person, plus unsure/.

    facesiam cluster PHOTOS --checkpoint RUN/best --report REPORT --out FOLDERS
    facesiam cluster PHOTOS --teacher dlib --threshold 0.92 --out FOLDERS
    facesiam cluster PHOTOS ... --out FOLDERS --truth parent      # identities known: print precision/recall, BCubed

FOLDERS/person_0001/... hold symbolic links to the photos (--copy: copies); the photos never move. Rename the
folders you recognise, check FOLDERS/report.html, and the result is an ImageFolder for make-shards.

PHOTOS may also be a shard folder, or shards at a URL (s3://bucket/shards, https://...): photos whose originals are
not on this machine are written from the images stored in the shards (cluster.json counts them as from_shards).
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from . import command
from .common import log_to_stderr
from .doctor import add_embedder_arguments, open_model, teacher_pass


def _parser() -> argparse.ArgumentParser:
    from ..curate.cluster import METHODS

    p = argparse.ArgumentParser(prog="cluster", description=__doc__.split("\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("photos", help="a folder of photos (any layout; every image below it), or shards (also at "
                                  "s3://, gs://, https://)")
    add_embedder_arguments(p, required=True)
    p.add_argument("--out", required=True, help="output folder: person_NNNN/, unsure/, clusters.csv, report.html")
    p.add_argument("--method", choices=METHODS, default="average",
                   help="average linkage at the threshold (default), graph (connected components), hdbscan")
    p.add_argument("--min-size", type=int, default=2, help="smaller clusters go to unsure/ (default %(default)s)")
    p.add_argument("--copy", action="store_true", help="copy the photos instead of linking them")
    p.add_argument("--truth", help="true identities, to score the clustering: 'parent' (each photo's folder) or a "
                                   "CSV of path,identity rows")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier cluster output at --out")
    return p


@command("cluster")
def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = _parser().parse_args(argv)
    log_to_stderr()
    from ..curate.folders import run_cluster
    from ..errors import InputError

    from ..eval.compare import decision_threshold

    threshold, source = decision_threshold(args.threshold, args.report, args.operating_point)
    embedder, name = open_model(args)
    if threshold is None and getattr(embedder, "same_person_threshold", None) is not None:
        threshold = embedder.same_person_threshold
        source = f"{name}'s own: FAR 1e-3 on LFW's training people"
    if threshold is None:
        raise InputError("clustering needs the model's same-person threshold: --report REPORT (facesiam evaluate "
                         "of this model) or --threshold T")
    summary = run_cluster(args.photos, args.out, embedder, model=name, threshold=threshold, threshold_source=source,
                          method=args.method, min_size=args.min_size, copy=args.copy, truth=args.truth,
                          workers=args.workers, batch_size=args.batch_size, num_workers=args.num_workers,
                          progress=args.progress, multi=args.multi, overwrite=args.overwrite,
                          detect=args.detect, teacher_pass=teacher_pass(args))
    print(f"{summary['count']} photos -> {summary['clusters']} people + {summary['unsure']} unsure in {args.out}")
    if "scores" in summary:
        s = summary["scores"]
        print(f"pairwise precision {s['pairwise_precision']:.4f} recall {s['pairwise_recall']:.4f} F "
              f"{s['pairwise_f']:.4f}; BCubed precision {s['bcubed_precision']:.4f} recall {s['bcubed_recall']:.4f} "
              f"F {s['bcubed_f']:.4f}")
    return summary
