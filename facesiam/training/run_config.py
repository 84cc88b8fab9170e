"""The run's record of its settings: RUN/config.yaml (written once, when the run starts) and RUN/config-history.yaml
(every allowed change made by a resume), and the check that a resume changes nothing else.

A resumed run must be the run it continues: a new learning rate, loss or embedding size under ``--resume latest``
would change the run silently (or end in a shape mismatch deep inside Accelerate). Only the settings in
``RESUME_MAY_CHANGE`` (when to stop, how fast data loads, how often to log, validate and checkpoint, where output
goes) may differ; they are appended to the history, and config.yaml keeps what the run started with.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import TrainConfig, config_from_dict, load_yaml, save_yaml, to_dict
from ..errors import InputError
from ..fileio import write_text
from .checkpoint import read_train_state

log = logging.getLogger("facesiam.train")

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config-history.yaml"

RESUME_MAY_CHANGE = frozenset({
    "max_steps", "num_workers", "log_every_steps", "val_every_steps", "val_batch_size", "checkpoint_every_steps",
    "keep_checkpoints", "output", "wandb", "wandb_project", "tensorboard", "val_bin", "collective_timeout",
})
"""Settings a resume may change: none of them changes what a step computes (the .bin sets are only scored)."""


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def read_history(run: Path) -> list[dict[str, Any]]:
    """The allowed changes made by earlier resumes, oldest first ([] when there were none)."""
    path = Path(run) / HISTORY_FILE
    if not path.is_file():
        return []
    entries = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    if not isinstance(entries, list):
        raise InputError(f"{path}: expected a list of changes; restore it or remove it")
    return entries


def effective_config(run: Path) -> Optional[TrainConfig]:
    """The settings the run last ran with: config.yaml with the history's changes applied (None: no config.yaml)."""
    path = Path(run) / CONFIG_FILE
    if not path.is_file():
        return None
    values = _flat(load_yaml(path))
    for entry in read_history(run):
        values.update({key: change[1] for key, change in (entry.get("changes") or {}).items()})
    nested: dict[str, Any] = {}
    for key, value in values.items():
        *sections, name = key.split(".")
        target = nested
        for section in sections:
            target = target.setdefault(section, {})
        target[name] = value
    try:
        return config_from_dict(nested)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None


def changes(old: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Every setting that differs (but ``resume``, which says how the run started, not what it runs): dotted key ->
    (old, new)."""
    a, b = _flat(to_dict(old)), _flat(to_dict(new))
    return {key: (a.get(key), b.get(key)) for key in b if a.get(key) != b.get(key) and key != "resume"}


def record_start(cfg: TrainConfig, run: Path, checkpoint: Optional[Path], write: bool = True) -> dict[str, tuple[Any, Any]]:
    """Check the new settings against the run being resumed and record them; returns the allowed changes.

    A fresh start (no checkpoint) writes RUN/config.yaml. A resume compares ``cfg`` with the settings of the run the
    checkpoint belongs to (its config.yaml and history): a change outside RESUME_MAY_CHANGE is refused in one line
    listing them all; allowed changes are appended to RUN/config-history.yaml and config.yaml is left as it was.
    ``write`` is False on every process but the main one (all check, one writes).
    """
    run = Path(run)
    if checkpoint is None:
        if write:
            save_yaml(cfg, run / CONFIG_FILE)
        return {}
    source = Path(checkpoint).resolve().parent.parent  # RUN/checkpoints/step-N -> RUN
    before = effective_config(source)
    if before is None:
        log.warning("resuming from %s: its run has no %s to compare the settings with", checkpoint, CONFIG_FILE)
        if write and not (run / CONFIG_FILE).is_file():
            save_yaml(cfg, run / CONFIG_FILE)
        return {}
    diff = changes(before, cfg)
    refused = sorted(key for key in diff if key.split(".")[-1] not in RESUME_MAY_CHANGE)
    if refused:
        shown = ", ".join(f"{key} {diff[key][0]!r} -> {diff[key][1]!r}" for key in refused[:6])
        more = f" (and {len(refused) - 6} more)" if len(refused) > 6 else ""
        raise InputError(f"--resume {checkpoint}: the resumed run must keep its settings, but {shown}{more} changed "
                         f"(see {source / CONFIG_FILE}); "
                         f"drop those flags, or start a new run with another --output")
    if write:
        if not (run / CONFIG_FILE).is_file():  # resumed into a new run directory: it starts from the source's record
            save_yaml(before, run / CONFIG_FILE)
        if diff:
            entries = read_history(run) + [{
                "resumed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "step": read_train_state(checkpoint).step, "checkpoint": str(checkpoint),
                "changes": {key: [old, new] for key, (old, new) in diff.items()}}]
            write_text(run / HISTORY_FILE, yaml.safe_dump(entries, sort_keys=False, allow_unicode=True))
            log.info("resumed with changed %s (recorded in %s)", ", ".join(sorted(diff)), run / HISTORY_FILE)
    return diff
