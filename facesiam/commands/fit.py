"""facesiam fit: a folder of your own photos (one sub-folder per person, not cropped) to a served model, in one command.

    facesiam fit PHOTOS --out RUN [--minutes 60] [--teacher dlib|onnx:FILE|none] [--clean] [--gallery]

Stages (skipped when done, continued when interrupted: run the same command again): align + shards -> the
teacher's pass -> check (the doctor's report; --clean quarantines its suspects into RUN/quarantine, undo with
facesiam doctor --undo, and trains without them) -> plan (--minutes split into steps by a short throughput probe)
-> distillation -> fine-tuning -> evaluation (RUN/report) -> ONNX export (+ --gallery) -> a summary and the
facesiam serve command. The work is facesiam.fit.fit.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from . import command
from .common import log_to_stderr


def _steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give DISTILL,FINETUNE steps, e.g. 300,100") from None
    if not 1 <= len(steps) <= 2 or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give DISTILL,FINETUNE steps (positive), e.g. 300,100")
    return steps


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fit", description=__doc__.split("\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("photos", help="ImageFolder of raw photos: PHOTOS/<person>/<photo>")
    p.add_argument("--out", required=True, help="run folder (outside PHOTOS): shards, runs, report, model.onnx")
    p.add_argument("--minutes", type=float, default=60.0, help="time budget of the whole fit (default %(default)s)")
    p.add_argument("--teacher", default="auto", help="dlib (pip install 'facesiam[teacher-dlib]'), onnx:FILE or none; "
                   "default auto: dlib when installed, else none (ImageNet or random start)")
    p.add_argument("--val-identities", type=float, default=0.1,
                   help="people held out to measure the model: a fraction or a count, at least 2 (default %(default)s)")
    p.add_argument("--clean", action="store_true", help="quarantine the doctor's suspects (wrong labels, duplicates, "
                   "non-faces) into RUN/quarantine before training; undo: facesiam doctor --undo RUN/quarantine/manifest-*")
    p.add_argument("--gallery", action="store_true", help="also build a gallery of the training people (RUN/gallery)")
    p.add_argument("--steps", type=_steps, help="DISTILL,FINETUNE steps instead of --minutes (a reproducible run)")
    p.add_argument("--on-no-face", choices=("skip", "center"), default="skip",
                   help="a photo without a detected face is skipped, or its centre is used (already-cropped faces)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every-steps", type=int, default=0, help="also checkpoint every N steps (0: at "
                   "epoch ends)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


@command("fit")
def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = _parser().parse_args(argv)
    log_to_stderr()
    from ..fit import fit

    return fit(args.photos, args.out, minutes=args.minutes, teacher=args.teacher, val_identities=args.val_identities,
               clean=args.clean, gallery=args.gallery, steps=args.steps, on_no_face=args.on_no_face, seed=args.seed,
               progress=args.progress, checkpoint_every_steps=args.checkpoint_every_steps)


if __name__ == "__main__":
    main()
