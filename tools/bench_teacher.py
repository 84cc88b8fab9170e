"""Benchmark: a distilled student on onnxruntime against its teacher (dlib), on the same LFW photos, in one run.

    python tools/bench_teacher.py [--images 200] [--student RUN/best | --onnx student.onnx] [--write-doc]

Four contenders, each timed over the same photos (best of --repeats, interleaved), one thread each:
  teacher, with detection:  dlib's detector + 5 points + 150 px chip (Teacher.prepare), then its ResNet (embed)
  teacher, network only:    its ResNet on the prepared chips
  student, with detection:  facesiam's MTCNN + 5-point alignment onto the 112 px template, then the ONNX network
  student, network only:    the ONNX network on the aligned crops
Without --student/--onnx the student is lfw_distill.yaml's network (tf_efficientnet_lite0, 128-d, 112 px) with
random weights: speed does not depend on the weights. Prints a markdown section; --write-doc puts it into
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LFW = REPO.parent / "shared" / "data" / "lfw-devtrain"
HEADING = "## Distillation: the student on onnxruntime vs its teacher (dlib)"


def best_of(repeats: int, contenders: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Best wall seconds of each contender over ``repeats`` interleaved rounds."""
    best = {name: float("inf") for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            t = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def student_onnx(args, tmp: Path) -> Path:
    """The ONNX file to time: --onnx, an export of --student, or lfw_distill.yaml's network with random weights."""
    from facesiam.export import export_onnx

    if args.onnx:
        return Path(args.onnx)
    checkpoint = args.student
    if checkpoint is None:
        import torch

        from facesiam.config import config_from_overrides
        from facesiam.faces.aligner import FaceAligner, alignment_info
        from facesiam.model import build_model, export_model

        torch.manual_seed(0)
        cfg = config_from_overrides(REPO / "launch" / "configs" / "lfw_distill.yaml", {}).model
        checkpoint = export_model(build_model(cfg), cfg, tmp / "student", alignment=alignment_info(FaceAligner()))
    out = tmp / "student.onnx"
    export_onnx(checkpoint, out)
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="photos (the first N of LFW-devtrain)")
    parser.add_argument("--student", help="a distilled run's best/ (default: the recipe's network, random weights)")
    parser.add_argument("--onnx", help="the student as an ONNX file")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="photos per network call (both networks)")
    parser.add_argument("--write-doc", action="store_true", help="replace this section of docs/benchmarks.md")
    args = parser.parse_args(argv)

    import torch

    from facesiam.data.folder import list_image_folder
    from facesiam.data.images import load_rgb
    from facesiam.faces.teachers import build_teacher
    from facesiam.onnx_runtime import OnnxEmbedder

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not LFW.is_dir():
        sys.exit(f"bench_teacher: {LFW} not found (LFW-devtrain beside the repository, in ../shared/data)")
    files = [LFW / rel for rel, _ in list_image_folder(LFW).samples[:args.images]]
    photos = [load_rgb(p) for p in files]
    teacher = build_teacher("dlib")
    with tempfile.TemporaryDirectory(prefix="bench_teacher_") as tmp:
        student = OnnxEmbedder(student_onnx(args, Path(tmp)), threads=1)
        aligner = student.aligner
        prepared = [teacher.prepare(p) for p in photos]
        chips = [p.input for p in prepared if p.input is not None]
        crops = [r.image for r in aligner.align_batch(photos) if r.image is not None]

        def batched(fn, items):
            return [fn(items[i:i + args.batch]) for i in range(0, len(items), args.batch)]

        contenders = {
            "teacher, with detection": lambda: batched(teacher.embed, [c for c in (teacher.prepare(p).input
                                                                                    for p in photos) if c is not None]),
            "teacher, network only": lambda: batched(teacher.embed, chips),
            "student, with detection": lambda: student.embed(photos, batch_size=args.batch),
            "student, network only": lambda: batched(student.embed_faces, crops),
        }
        seconds = best_of(args.repeats, contenders)
    n = len(photos)
    rate = {k: n / v for k, v in seconds.items()}
    date = datetime.date.today().isoformat()
    lines = [HEADING, "",
             f"{date}, `python tools/bench_teacher.py --images {n}"
             f"{' --student RUN/best' if args.student else ' --onnx FILE' if args.onnx else ''}` on {platform.machine()} with {os.cpu_count()} "
             f"cores shared with other jobs, one thread per contender, batches of {args.batch}, best of "
             f"{args.repeats} interleaved rounds. Photos: the first {n} of LFW-devtrain, 250x250 (Huang et al., "
             f"UMass TR 07-49, 2007). Teacher: dlib {teacher.fingerprint().get('dlib', '')} ResNet descriptor "
             f"(128-d, 150 px chips; its detector found {len(chips)} of {n} faces). Student: "
             f"{student.meta.get('backbone')} {student.embedding_dim}-d at {student.image_size} px on onnxruntime "
             f"({'weights of ' + str(args.student or args.onnx) if (args.student or args.onnx) else 'random weights: speed does not depend on them'}); "
             f"facesiam's MTCNN aligned {len(crops)} of {n}.", "",
             "| | photos/s (teacher) | photos/s (student) | student / teacher |", "|---|---:|---:|---:|"]
    for what in ("with detection", "network only"):
        t, s = rate[f"teacher, {what}"], rate[f"student, {what}"]
        lines.append(f"| {what} | {t:.1f} | {s:.1f} | **{s / t:.2f}x** |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_doc:
        _write_doc(text)
    return text


def _write_doc(text: str) -> None:
    from facesiam.fileio import write_text

    doc = REPO / "docs" / "benchmarks.md"
    old = doc.read_text(encoding="utf-8")
    start = old.find(HEADING)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(HEADING))
        new = old[:start] + text + ("\n" + old[end + 1:] if end >= 0 else "")
    write_text(doc, new)


if __name__ == "__main__":
    main()
