"""Arguments shared by several commands (not a command itself)."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def add_model_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--checkpoint/--data/--split/--flip/--batch-size/--num-workers, shared by embed, evaluate and gallery."""
    p.add_argument("--checkpoint", required=required, help="exported model: RUN/best (or a RUN directory)")
    p.add_argument("--data", required=required, help="ImageFolder directory or shard directory (dataset.json)")
    p.add_argument("--split", default="val", help="shard split to embed (ignored for an ImageFolder; default: val)")
    p.add_argument("--flip", action="store_true", help="add the mirrored image's embedding (LFW convention)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")


def log_to_stderr() -> None:
    """Commands log what they did (and how fast) as plain lines on stderr; stdout stays for results."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
