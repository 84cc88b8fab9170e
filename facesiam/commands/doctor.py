"""facesiam doctor: find wrong labels, duplicates, one person under two names and bad photos in a data set.

    facesiam doctor DATA --checkpoint RUN/best --report REPORT --out DOCTOR      # examine; read DOCTOR/report.html
    facesiam doctor DATA --teacher dlib --out DOCTOR                            # no model of your own yet
    facesiam doctor DATA --findings DOCTOR --apply quarantine QUARANTINE        # move the suspects out
    facesiam doctor --undo QUARANTINE/manifest-....json                         # and back
    facesiam make-shards DATA SHARDS --exclude DOCTOR/findings.jsonl            # or pack without them

DATA is an ImageFolder of raw photos (aligned as the model was trained), an aligned folder or a shard folder, also
at a URL (s3://bucket/shards, gs://..., https://...: facesiam/data/remote.py). A teacher on shards goes through the
teacher pass (training/teacher_pass.py): a teacher cache that a distillation run or `embed --teacher` filled for the
same shards and teacher is reused, and one the doctor fills serves them.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

from . import command
from .common import add_model_choice, add_threshold_arguments, log_to_stderr

log = logging.getLogger("facesiam.curate")


def add_embedder_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    """--checkpoint | --onnx | --teacher: the model that embeds the photos (doctor and cluster)."""
    model = add_model_choice(p, required)
    model.add_argument("--teacher", help="a face model that needs no training: dlib (pip install "
                                         "'facesiam[teacher-dlib]') or onnx:PATH; on shards its cached teacher pass")
    add_threshold_arguments(p, required=False)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--multi", choices=("largest", "central"), default="largest",
                   help="with several faces keep the largest or the most central one, when the model does not say "
                        "(trained on unaligned images, or a teacher) (default %(default)s)")
    p.add_argument("--no-detect", dest="detect", action="store_false",
                   help="for a model trained on unaligned images: do not run the face detector (no face checks)")
    p.add_argument("--workers", type=int, default=None,
                   help="face-detection processes, and a teacher's on a photo folder (default: all CPUs)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for embedding")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def open_model(args: argparse.Namespace):
    """(embedder, its name for reports)."""
    if args.teacher:
        from ..faces.teachers import build_teacher

        return build_teacher(args.teacher), f"teacher {args.teacher}"
    from ..eval.embed import open_embedder

    return open_embedder(args.checkpoint, args.onnx, device=args.device), str(args.checkpoint or args.onnx)


def teacher_pass(args: argparse.Namespace):
    """How a teacher embeds shards (curate/photos.load_photos): the cached teacher pass; None without a teacher."""
    if not args.teacher:
        return None
    from ..training.teacher_pass import teacher_targets

    return teacher_targets


def _parser() -> argparse.ArgumentParser:
    from ..curate.checks import CheckSettings
    from ..curate.doctor import DEFAULT_MERGE_FAR, DEFAULT_STRANGER_FAR

    p = argparse.ArgumentParser(prog="doctor", description=__doc__.split("\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("data", nargs="?", help="ImageFolder, aligned folder or shard folder (or shards at s3://, gs://, "
                                           "https://)")
    add_embedder_arguments(p, required=False)
    p.add_argument("--out", help="report folder: findings.jsonl, report.html, report.md, doctor.json")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier doctor report at --out")
    p.add_argument("--far", type=float, default=1e-3, help="FAR of the same-person threshold estimated from the data "
                   "when neither --report nor --threshold is given (default %(default)s)")
    p.add_argument("--stranger-far", type=float, default=DEFAULT_STRANGER_FAR,
                   help="a photo with no other photo of its identity above the threshold at this FAR (from the report "
                        "or the data) is a wrong-label candidate (default %(default)s)")
    p.add_argument("--merge-threshold", type=float, help="cosine of two identity centres that makes them one person "
                   "(default: estimated from the data at --merge-far)")
    p.add_argument("--merge-far", type=float, default=DEFAULT_MERGE_FAR,
                   help="FAR of the merge threshold (default %(default)s)")
    p.add_argument("--near-duplicate", type=float, default=CheckSettings.near_duplicate, help="embedding cosine above "
                   "which photos are compared by perceptual hash (default %(default)s)")
    p.add_argument("--phash-bits", type=int, default=CheckSettings.phash_bits,
                   help="largest pHash distance (of 64 bits) of near duplicates (default %(default)s)")
    p.add_argument("--blur", type=float, default=CheckSettings.blur,
                   help="variance of the Laplacian below which a crop is blurred (default %(default)s)")
    p.add_argument("--min-confidence", type=float, default=CheckSettings.min_confidence,
                   help="detector score below which a face is doubtful (default %(default)s)")
    p.add_argument("--apply", nargs=2, metavar=("quarantine", "DIR"),
                   help="move the suspects of the findings (--findings, or those just made) to DIR; a manifest in "
                        "DIR undoes it")
    p.add_argument("--findings", help="findings.jsonl (or its report folder) to apply")
    p.add_argument("--kinds", help="apply only these kinds, comma-separated (default: every quarantine suggestion)")
    p.add_argument("--undo", metavar="MANIFEST", help="put back the photos a quarantine moved")
    return p


@command("doctor")
def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _parser()
    args = p.parse_args(argv)
    log_to_stderr()
    from ..curate.quarantine import undo_quarantine

    if args.undo:
        back = undo_quarantine(args.undo)
        print(f"moved {back} photos back")
        return {"restored": back}
    has_model = bool(args.checkpoint or args.onnx or args.teacher)
    if not args.data or not (has_model or args.apply):
        p.error("give DATA and a model (--checkpoint, --onnx or --teacher) and --out, or --apply, or --undo")
    if args.apply and args.apply[0] != "quarantine":
        p.error(f"--apply knows one action, quarantine (got {args.apply[0]!r})")
    result: dict = {}
    if has_model:
        if not args.out:
            p.error("--out REPORT is required to examine DATA")
        result = _examine(args)
    if args.apply:
        result["quarantine"] = _apply(args)
    return result


def _examine(args: argparse.Namespace) -> dict:
    from ..curate.doctor import run_doctor

    embedder, name = open_model(args)
    settings = {"near_duplicate": args.near_duplicate, "phash_bits": args.phash_bits, "blur": args.blur,
                "min_confidence": args.min_confidence}
    same_person = args.threshold
    if same_person is None and args.report is None:  # a teacher knows its own threshold
        same_person = getattr(embedder, "same_person_threshold", None)
    summary = run_doctor(args.data, args.out, embedder, model=name, report=args.report,
                         operating_point=args.operating_point, same_person=same_person, far=args.far,
                         stranger_far=args.stranger_far, merge=args.merge_threshold, merge_far=args.merge_far,
                         settings=settings, detect=args.detect,
                         workers=args.workers, batch_size=args.batch_size, num_workers=args.num_workers,
                         progress=args.progress, multi=args.multi, overwrite=args.overwrite,
                         teacher_pass=teacher_pass(args))
    found = ", ".join(f"{k} {v}" for k, v in summary["counts"].items() if v) or "nothing"
    print(f"{summary['photos']} photos: {found}; {summary['suspects']} suggested for quarantine")
    print(f"report: {Path(args.out) / 'report.html'}  findings: {Path(args.out) / 'findings.jsonl'}")
    return summary


def _apply(args: argparse.Namespace) -> dict:
    from ..curate.findings import read_findings, suspects
    from ..curate.quarantine import apply_quarantine
    from ..errors import InputError

    where = Path(args.findings or args.out or "")
    if not (args.findings or args.out):
        raise InputError("--apply needs the findings: --findings REPORT/findings.jsonl (or --out with a model)")
    findings = read_findings(where)
    report = (where if where.is_dir() else where.parent) / "doctor.json"
    root = Path(args.data)
    if report.is_file():  # the doctor names source photos: for shards or an aligned folder, their own folder
        root = Path(json.loads(report.read_text(encoding="utf-8")).get("root") or root)
    kinds = set(args.kinds.split(",")) if args.kinds else None
    files = suspects(findings, kinds)
    reasons = {p: f"{f.kind}: {f.reason}" for f in findings for p in f.suspects}
    manifest, moved = apply_quarantine(files, root, args.apply[1], reasons)
    print(f"moved {moved} photos from {root} to {args.apply[1]}; undo: facesiam doctor --undo {manifest}")
    return {"manifest": str(manifest), "moved": moved}
