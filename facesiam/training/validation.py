"""What validation does: embed the held-out people on every process, score them on the main one with the same
``evaluate`` as the evaluate command, log, and export RUN/best/ when the selection metric improves.

When it runs is decided in training/cadence.py.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import numpy as np

from ..config import TrainConfig
from ..selection import selection_value
from .checkpoint import Checkpointer, TrainState
from .tracking import RunLogger

log = logging.getLogger("facesiam.train")


class Validator:
    """Scores the validation split and keeps RUN/best/ at the best value of ``cfg.best_metric``."""

    def __init__(self, accelerator, cfg: TrainConfig, dataset, checkpointer: Checkpointer, logger: RunLogger,
                 probe: Optional[Callable[[np.ndarray], dict[str, Any]]] = None):
        self.accelerator = accelerator
        self.probe = probe  # embeddings -> more metrics (a distillation run's student-teacher cosine)
        self.cfg = cfg
        self.dataset = dataset
        self.checkpointer = checkpointer
        self.logger = logger

    def run(self, model, state: TrainState) -> dict[str, Any]:
        """Validate ``model`` (eval mode inside); updates state.best_* on every rank; returns the value and best."""
        from accelerate.utils import broadcast_object_list

        from ..eval.embed import embed_dataset

        t0 = time.time()
        with self.accelerator.autocast():
            emb, labels = embed_dataset(model, self.dataset, batch_size=self.cfg.val_batch_size,
                                        num_workers=self.cfg.num_workers, accelerator=self.accelerator,
                                        progress=False)
        payload = [None]
        if self.accelerator.is_main_process:
            payload = [self._score(model, state, emb, labels, t0)]
        broadcast_object_list(payload, from_process=0)
        state.best_value, state.best_step = payload[0]["best_value"], payload[0]["best_step"]
        return payload[0]

    def _score(self, model, state: TrainState, emb, labels, t0: float) -> dict[str, Any]:
        from ..eval.pipeline import evaluate

        cfg = self.cfg
        metrics = evaluate({"embeddings": emb, "labels": labels, "paths": self.dataset.paths,
                            "classes": self.dataset.classes, "meta": {"data": cfg.data, "split": cfg.val_split}})
        if self.probe is not None:
            metrics["distillation"] = self.probe(emb)
        value = selection_value(metrics, cfg.best_metric)
        if value is None:
            log.warning("validation metric %s undefined (too few pairs); selecting by auc", cfg.best_metric)
            value = selection_value(metrics, "auc")
        improved = state.best_value is None or value > state.best_value
        if improved:
            state.best_value, state.best_step = value, state.step
            self.checkpointer.export(model, cfg.model, "best", {"step": state.step, "epoch": state.epoch,
                                                                 "selected_by": cfg.best_metric, "value": value,
                                                                 "metrics": metrics})
        v, i = metrics["verification"], metrics["identification"]
        seconds = time.time() - t0
        self.logger.log({"epoch": state.epoch, "val/auc": v["auc"], "val/eer": v["eer"],
                         "val/tar_at_far_1e-03": v["tar_at_far"]["1e-03"], "val/rank1": i["rank1"],
                         "val/map_at_r": i["map_at_r"], f"val/best_{cfg.best_metric}": state.best_value,
                         "val/seconds": seconds, **({"val/teacher_cosine": metrics["distillation"]["teacher_cosine"]}
                                                    if "distillation" in metrics else {})}, step=state.step)
        self._log_roc(metrics, state.step)
        teacher = (f", student-teacher cosine {metrics['distillation']['teacher_cosine']:.4f}"
                   if metrics.get("distillation", {}).get("teacher_cosine") is not None else "")
        log.info("validation at step %d: AUC %.4f, EER %.4f, TAR@FAR=1e-3 %s, rank-1 %.4f%s (%.1fs)%s",
                 state.step, v["auc"], v["eer"], v["tar_at_far"]["1e-03"], i["rank1"], teacher, seconds,
                 " -> new best, exported to best/" if improved else "")
        return {"value": value, "best_value": state.best_value, "best_step": state.best_step}

    def _log_roc(self, metrics: dict, step: int) -> None:
        try:
            import matplotlib.pyplot as plt

            from ..eval.plots import roc_figure

            fig = roc_figure(metrics)
            self.logger.log_figure("val/roc", fig, step)
            plt.close(fig)
        except Exception as err:  # noqa: BLE001 -- a plotting problem must never stop training
            log.warning("could not log the ROC figure: %s", err)
