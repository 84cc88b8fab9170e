"""Arguments shared by several commands (not a command itself)."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def add_model_arguments(p: argparse.ArgumentParser, required: bool = True, onnx: bool = False,
                        teacher: bool = False) -> None:
    """--checkpoint/--data/--split/--flip/--batch-size/--num-workers, shared by embed, evaluate and gallery;
    ``onnx``: --onnx FILE as the other way to give the model (one of the two is then required); ``teacher``: a
    distillation teacher as a third (--teacher SPEC and its options; shard data only)."""
    if onnx:
        model = add_model_choice(p, required)
        if teacher:
            from ..config import CHOICES, DistillConfig, field_docs

            model.add_argument("--teacher", help="a distillation teacher (dlib or onnx:PATH) on shard data: its "
                                                 "embedding of each photo, as a distillation run caches it")
            docs = field_docs()
            floats = lambda text: [float(v) for v in text.split(",")]  # noqa: E731  "0.5,0.5,0.5"
            types = {"teacher_size": int, "teacher_mean": floats, "teacher_std": floats, "teacher_align": str,
                     "teacher_source": str}
            for name, type_ in types.items():
                p.add_argument("--" + name.replace("_", "-"), type=type_, default=getattr(DistillConfig, name, None),
                               choices=CHOICES.get(f"distill.{name}"), help=docs.get(name, "").replace("%", "%%"))
    else:
        p.add_argument("--checkpoint", required=required, help="exported model: RUN/best (or a RUN directory)")
    p.add_argument("--data", required=required, help="ImageFolder directory or shard directory (dataset.json)")
    p.add_argument("--split", default="val", help="shard split to embed (ignored for an ImageFolder; default: val)")
    p.add_argument("--flip", action="store_true", help="add the mirrored image's embedding (LFW convention)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    add_align_argument(p)


def add_model_choice(p: argparse.ArgumentParser, required: bool) -> argparse._MutuallyExclusiveGroup:
    """--checkpoint RUN/best | --onnx FILE: the two ways to give a trained model (the group, to add a third)."""
    model = p.add_mutually_exclusive_group(required=required)
    model.add_argument("--checkpoint", help="exported model: RUN/best (or a RUN directory), run on torch")
    model.add_argument("--onnx", help="an ONNX export (facesiam export RUN/best --onnx FILE), run on onnxruntime")
    return model


def add_align_argument(p: argparse.ArgumentParser) -> None:
    """--no-align: for a model trained on aligned faces, feed the images as they are (already aligned crops)."""
    p.add_argument("--no-align", dest="align", action="store_false",
                   help="the images are already aligned face crops: do not detect and align them (a model "
                        "trained on aligned faces otherwise aligns raw images the way it was trained)")


def add_threshold_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    """--threshold T | --report REPORT [--operating-point POINT]: where the same/different threshold comes from
    (compare and serve: one definition, so both decide alike; eval.compare.decision_threshold reads them)."""
    from ..eval.compare import DEFAULT_OPERATING_POINT, OPERATING_POINTS

    decide = p.add_mutually_exclusive_group(required=required)
    decide.add_argument("--threshold", type=float, help="same person when cosine similarity >= THRESHOLD")
    decide.add_argument("--report", help="take the threshold from REPORT/metrics.json (tools/evaluate.py)")
    p.add_argument("--operating-point", default=DEFAULT_OPERATING_POINT, choices=OPERATING_POINTS,
                   help="which threshold of the report: best (balanced accuracy), eer, pairs (the pairs file's "
                        "10-fold threshold) or far=X (the lowest all-pairs threshold with FAR <= X); default "
                        "%(default)s, the strict point a deployed verifier uses")


def add_alignment_options(p: argparse.ArgumentParser, size_flag: str = "--size") -> None:
    """How faces are detected and aligned: align_faces and make_shards --align."""
    from ..faces.aligner import DEFAULT_DETECTOR, MULTI_CHOICES, NO_FACE_CHOICES
    from ..faces.detectors import DETECTORS
    from ..faces.template import TEMPLATE_SIZE

    p.add_argument(size_flag, dest="align_size", type=int, default=TEMPLATE_SIZE,
                   help="aligned crop side in pixels; the template is scaled by size/112 (default %(default)s)")
    p.add_argument("--detector", default=DEFAULT_DETECTOR, choices=DETECTORS.names(),
                   help=f"face detector: {DETECTORS.describe()} (default %(default)s)")
    p.add_argument("--device", default="cpu", help="detector device: cpu or cuda (default %(default)s)")
    p.add_argument("--on-no-face", choices=NO_FACE_CHOICES, default="skip",
                   help="an image without a face is skipped, or its centre is cropped (default %(default)s)")
    p.add_argument("--multi", choices=MULTI_CHOICES, default="largest",
                   help="with several faces keep the largest, or the one nearest the image centre "
                        "(LFW-style crops: central) (default %(default)s)")
    p.add_argument("--min-face-size", type=int, default=20,
                   help="smallest face searched for and kept, in source pixels (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per detector call (default: the detector's own; MTCNN: 16 on CPU, 64 on GPU)")


def alignment_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of align_folder / align_shards from add_alignment_options' flags."""
    return {"size": args.align_size, "device": args.device, "on_no_face": args.on_no_face, "multi": args.multi,
            "min_face_size": args.min_face_size, "batch_size": args.batch_size, "detector": args.detector}


class ProgressBar:
    """A tqdm bar made on the first report (an error before any work prints only its one line); a callable
    ``(done, total)`` for align_folder's ``progress``."""

    def __init__(self, desc: str, disable: bool = False):
        self.desc, self.disable, self.bar = desc, disable, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc=self.desc, disable=self.disable, smoothing=0.1)
        self.bar.update(done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def log_to_stderr() -> None:
    """Commands log what they did (and how fast) as plain lines on stderr; stdout stays for results."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
