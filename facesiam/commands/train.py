"""facesiam train (and launch/train.py): flags and the experiment YAML -> a TrainConfig -> training.Trainer.

    accelerate launch --config_file accelerate_configs/cpu.yaml launch/train.py --data SHARDS --output RUN
    python launch/train.py --data SHARDS --output RUN --config launch/configs/seed.yaml --max-steps 100

Every config field is a flag (``embedding_dim`` -> ``--embedding-dim``); flags override the --config YAML.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

from ..config import CHOICES, FLAG_FIELDS, REGISTRIES, config_from_overrides, field_docs, loss_defaults_help
from . import command


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --config and one flag per config field (default None: only given flags override).

    A field with a closed set of values (a registry's names, a Literal) gets argparse choices, so --help lists them
    and a typo is refused with the list; a registry's entries add their one-line docs to the help.
    """
    parser.add_argument("--config", help="experiment YAML (launch/configs/*.yaml); flags override it")
    docs = field_docs()
    for name, (section, _) in FLAG_FIELDS.items():
        key = f"{section}.{name}" if section else name
        help = f"{key}: {docs[name]}" if docs.get(name) else key
        if key in REGISTRIES:
            help += f" Choices: {REGISTRIES[key].describe()}."
        if key in ("loss.margin", "loss.scale"):
            help += " " + loss_defaults_help(name)
        choices = ["none" if c is None else c for c in CHOICES[key]] if key in CHOICES else None
        if getattr(REGISTRIES.get(key), "open_names", False):  # e.g. best_metric bin:NAME: the registry checks it
            choices = None
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, choices=choices,
                            metavar=None if choices else name.upper(), help=help.replace("%", "%%"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train", description="Train a face-embedding model on WebDataset shards (single process, or under "
        "accelerate launch for DDP). Flags override the --config YAML; run with --help for all of them.")
    add_config_arguments(p)
    return p


def config_from_args(args: argparse.Namespace):
    """Defaults <- --config YAML <- the flags that were given."""
    overrides = {name: getattr(args, name) for name in FLAG_FIELDS if getattr(args, name, None) is not None}
    return config_from_overrides(getattr(args, "config", None), overrides)


@command("train")
def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from ..training import train

    return train(config_from_args(parser().parse_args(argv)))
