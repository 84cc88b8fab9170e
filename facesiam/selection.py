"""Validation metrics that can select RUN/best (``best_metric``), by name: how to read each from the metrics dict of
``eval.pipeline.evaluate``. Higher is always better (EER is negated)."""

from __future__ import annotations

from typing import Any, Callable, Optional

from .registry import Registry

SELECTION_METRICS = Registry("selection metric")
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
