"""Validation metrics that can select RUN/best (``best_metric``), by name: how to read each from the metrics dict of
``eval.pipeline.evaluate``. Higher is always better (EER is negated)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from .errors import InputError
from .registry import Entry, Registry

BIN_PREFIX = "bin:"


def bin_name(path: Union[str, os.PathLike]) -> str:
    """The set's name: the file name without .bin (``data/cfp_fp.bin`` -> ``cfp_fp``)."""
    name = Path(path).name
    return name[:-4] if name.lower().endswith(".bin") else name


def bin_paths(spec: Union[str, Sequence[str], None]) -> list[str]:
    """``"a/lfw.bin,b/cfp_fp.bin"`` (or a list) -> the paths; two sets with the same name are an error."""
    paths = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else (spec or [])) if p and p.strip()]
    names = [bin_name(p) for p in paths]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        same = ", ".join(p for p in paths if bin_name(p) == twice[0])
        raise InputError(f"two verification sets are called {twice[0]!r} ({same}); their names (file names without "
                         ".bin) must differ: rename one")
    return paths


def _bin_set(name: object) -> Optional[str]:
    """NAME of a ``bin:NAME`` selection metric, else None."""
    if isinstance(name, str) and name.startswith(BIN_PREFIX) and len(name) > len(BIN_PREFIX):
        return name[len(BIN_PREFIX):]
    return None


class SelectionMetrics(Registry):
    """The registry, plus one entry per .bin verification set: ``bin:cfp_fp`` selects by the 10-fold accuracy of
    val_bin's cfp_fp.bin (its name: the file name without .bin), and refuses a set that val_bin does not list."""

    open_names = True
    """Names beyond the registered ones are valid (bin:NAME): a command line must not limit them to names()."""

    def get(self, name: str) -> Entry:
        set_name = _bin_set(name)
        if set_name is None:
            try:
                return super().get(name)
            except InputError as err:
                raise InputError(f"{err}, or {BIN_PREFIX}NAME (a --val-bin set)") from None

        def check(cfg: Any) -> None:
            names = [bin_name(p) for p in bin_paths(cfg.val_bin)]
            if set_name not in names:
                raise InputError(f"best_metric {name} selects by the verification set {set_name}.bin, which val_bin "
                                 f"does not list ({', '.join(names) or 'empty'}); add --val-bin PATH/{set_name}.bin")

        return Entry(name, _reader("bin", set_name, "accuracy_mean"),
                     f"the 10-fold accuracy of the .bin set {set_name}", check)

    def describe(self) -> str:
        return super().describe() + f"; {BIN_PREFIX}NAME: 10-fold accuracy of the --val-bin set NAME.bin"

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or _bin_set(name) is not None


SELECTION_METRICS = SelectionMetrics("selection metric")
"""name -> build(metrics: dict) -> the value (higher is better), or None when the metric is undefined."""


def _reader(section: str, *keys: str, sign: float = 1.0) -> Callable[[dict], Optional[float]]:
    """Read metrics[section][keys...] as a float (times sign); None when absent or undefined."""
    def read(metrics: dict[str, Any]) -> Optional[float]:
        value: Any = metrics.get(section, {})
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return None if value is None else sign * float(value)

    return read


SELECTION_METRICS.register("tar_at_far_1e-03", _reader("verification", "tar_at_far", "1e-03"),
                           doc="verification: true accepts at a false-accept rate of 1e-3")
SELECTION_METRICS.register("auc", _reader("verification", "auc"), doc="verification: area under the ROC")
SELECTION_METRICS.register("rank1", _reader("identification", "rank1"), doc="identification: rank-1 accuracy")
SELECTION_METRICS.register("map_at_r", _reader("identification", "map_at_r"), doc="identification: MAP@R")
SELECTION_METRICS.register("neg_eer", _reader("verification", "eer", sign=-1.0),
                           doc="verification: minus the equal error rate")
SELECTION_METRICS.register("teacher_cosine", _reader("distillation", "teacher_cosine"),
                           doc="distillation: mean student-teacher cosine on the held-out photos")


def selection_value(metrics: dict[str, Any], name: str) -> Optional[float]:
    """The value of selection metric ``name`` in ``metrics`` (higher is better); None when it is undefined."""
    return SELECTION_METRICS.get(name).build(metrics)
