"""The command floor: one module per command (argparse, printing), and the ONE error path they share.

``facesiam COMMAND ...``, ``tools/*.py`` and ``launch/train.py`` all call ``facesiam.commands.<name>.main(argv)``.
Nothing in the library imports this package: it sits on top.

Errors: a command's ``main`` is wrapped by ``command(prog)``. Expected failures -- ``facesiam.errors.FacesiamError``
(bad input the library recognised) and a missing or existing file -- end with one line ``prog: message`` on
stderr and exit status 1, without a traceback; argparse's usage errors keep their exit status 2; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Any, Callable, Optional, Sequence

from ..errors import FacesiamError

EXPECTED_ERRORS = (FacesiamError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)

COMMANDS = {
    "demo": ("demo", "the whole path on generated faces: data -> shards -> train -> evaluate"),
    "fit": ("fit", "your own photos -> a served model in one command (check, align, distil, fine-tune, evaluate, export)"),
    "make-synthetic-faces": ("make_synthetic_faces", "write an ImageFolder of procedurally drawn faces"),
    "align-faces": ("align_faces", "detect faces and align them to 112x112 crops (5-point similarity transform)"),
    "make-shards": ("make_shards", "pack an ImageFolder (or insightface RecordIO data) into WebDataset shards"),
    "export-rec": ("export_rec", "write shards as insightface RecordIO (train.rec/.idx/property) for other trainers"),
    "train": ("train", "train a model (use `accelerate launch launch/train.py` for several processes)"),
    "embed": ("embed", "embed an ImageFolder or shard split with a trained model"),
    "evaluate": ("evaluate", "1:1 verification and 1:N identification metrics, plots, report"),
    "make-pairs": ("make_pairs", "write an LFW-format pairs file for a data set"),
    "make-bin": ("make_bin", "write an insightface .bin verification set (lfw.bin's format) from aligned crops"),
    "doctor": ("doctor", "find wrong labels, duplicates, merged people and bad photos; quarantine and undo"),
    "cluster": ("cluster", "sort unlabelled photos into one folder per proposed person (+ unsure/)"),
    "gallery": ("gallery", "build, extend and search a persistent FAISS gallery"),
    "compare": ("compare", "cosine similarity of two face images and the same/different decision"),
    "serve": ("serve", "the face-verification and search service with a web page (FastAPI on uvicorn)"),
    "export": ("export", "export a trained model to ONNX (dynamic batch, preprocessing and alignment as metadata)"),
    "convert-weights": ("convert_weights", "convert third-party ImageNet weights for --pretrained"),
    "model-stats": ("model_stats", "parameters, GMACs and GFLOPs of backbones (face backbones at 112 px)"),
}


def one_line(err: BaseException) -> str:
    """The error's message on one line (an OSError without a custom message still names its file)."""
    text = str(err) or type(err).__name__
    return " ".join(text.split())


def command(prog: str) -> Callable[[Callable[[Optional[Sequence[str]]], Any]], Callable[..., Any]]:
    """Decorate a command's ``main(argv)``: expected failures become ``SystemExit("prog: message")`` (status 1)."""

    def wrap(run: Callable[[Optional[Sequence[str]]], Any]) -> Callable[..., Any]:
        @functools.wraps(run)
        def main(argv: Optional[Sequence[str]] = None) -> Any:
            try:
                return run(argv)
            except EXPECTED_ERRORS as err:
                raise SystemExit(f"{prog}: {one_line(err)}") from None

        return main

    return wrap


def main(argv: Optional[Sequence[str]] = None) -> Any:
    """The ``facesiam`` executable: ``facesiam COMMAND [options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items()]
        print("usage: facesiam COMMAND [options]   (facesiam COMMAND --help for each)\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"facesiam: unknown command {argv[0]!r}")
        return None
    module = importlib.import_module(f"{__name__}.{COMMANDS[argv[0]][0]}")
    return module.main(argv[1:])


def cli() -> None:
    """The console script: ``main`` for the shell. A command's return value (a summary dict, for callers in
    Python and tests) is not an exit status: success exits 0, failures exit through SystemExit."""
    main()
