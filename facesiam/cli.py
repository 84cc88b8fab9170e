"""The `facesiam` command: one subcommand per tool, each the same main() that tools/*.py and launch/train.py call."""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Any, Callable, Optional, Sequence

COMMANDS = {
    "demo": ("facesiam.demo", "the whole path on generated faces: data -> shards -> train -> evaluate"),
    "make-synthetic-faces": ("facesiam.data.synthetic", "write an ImageFolder of procedurally drawn faces"),
    "align-faces": ("facesiam.commands.align_faces",
                    "detect faces and align them to 112x112 crops (5-point similarity transform)"),
    "make-shards": ("facesiam.data.shards", "pack an ImageFolder into WebDataset shards"),
    "train": ("facesiam.train", "train a model (use `accelerate launch launch/train.py` for several processes)"),
    "embed": ("facesiam.embed", "embed an ImageFolder or shard split with a trained model"),
    "evaluate": ("facesiam.evaluate", "1:1 verification and 1:N identification metrics, plots, report"),
    "make-pairs": ("facesiam.pairs", "write an LFW-format pairs file for a data set"),
    "gallery": ("facesiam.gallery", "build, extend and search a persistent FAISS gallery"),
    "compare": ("facesiam.compare", "cosine similarity of two face images and the same/different decision"),
    "convert-weights": ("facesiam.convert_weights", "convert third-party ImageNet weights for --pretrained"),
}


def one_line_errors(prog: str, run: Callable[[Optional[Sequence[str]]], Any]) -> Callable[..., Any]:
    """A tool's main(argv): bad input (missing file, bad value) ends with one line naming it, not a traceback."""

    @functools.wraps(run)
    def main(argv: Optional[Sequence[str]] = None) -> Any:
        try:
            return run(argv)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"{prog}: {err}") from None

    return main


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items()]
        print("usage: facesiam COMMAND [options]   (facesiam COMMAND --help for each)\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"facesiam: unknown command {argv[0]!r}")
        return
    module = importlib.import_module(COMMANDS[argv[0]][0])
    module.main(argv[1:])


if __name__ == "__main__":
    main()
