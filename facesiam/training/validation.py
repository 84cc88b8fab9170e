"""What validation does: embed the held-out people on every process, score them on the main one with the same
``evaluate`` as the evaluate command, log, and export RUN/best/ when the selection metric improves. The .bin
verification sets of ``val_bin`` are scored alongside with the field's 10-fold protocol (eval/verification_bin.py),
or alone when the data has no val split.

When it runs is decided in training/cadence.py.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..config import TrainConfig
from ..eval.verification_bin import BinSet, bin_metrics, bin_paths, bin_summary_line, embed_bin, read_bin
from ..selection import BIN_PREFIX, selection_value
from .checkpoint import Checkpointer, TrainState
from .preemption import shielded_worker_init
from .tracking import RunLogger

log = logging.getLogger("facesiam.train")


def build_validator(accelerator, cfg: TrainConfig, dataset, checkpointer: Checkpointer, logger: RunLogger,
                    probe: Optional[Callable[[np.ndarray], dict[str, Any]]] = None) -> Optional["Validator"]:
    """The run's Validator: on the val split (``dataset``, None when absent) and the ``val_bin`` sets (read here,
    on every rank, before training starts: a bad file fails at once); None when there is neither."""
    bins = [read_bin(p) for p in bin_paths(cfg.val_bin)]
    if dataset is None and not bins:
        return None
    return Validator(accelerator, cfg, dataset, checkpointer, logger, probe=probe, bins=bins)


class Validator:
    """Scores the validation split and the .bin sets and keeps RUN/best/ at the best value of the selection metric
    (``cfg.best_metric``; without a val split, a val-split metric falls back to the first set's bin:NAME)."""

    def __init__(self, accelerator, cfg: TrainConfig, dataset, checkpointer: Checkpointer, logger: RunLogger,
                 probe: Optional[Callable[[np.ndarray], dict[str, Any]]] = None, bins: Sequence[BinSet] = ()):
        from ..model import eval_transform_for

        self.accelerator = accelerator
        self.probe = probe  # embeddings -> more metrics (a distillation run's student-teacher cosine)
        self.cfg = cfg
        self.dataset = dataset
        self.bins = list(bins)
        self.bin_transform = eval_transform_for(cfg.model)  # the val split's transform (setup.build_data)
        self.checkpointer = checkpointer
        self.logger = logger
        self.metric = cfg.best_metric
        if dataset is None and not self.metric.startswith(BIN_PREFIX):
            self.metric = BIN_PREFIX + self.bins[0].name
            if accelerator.is_main_process:
                log.warning("no val split: best/ is selected by %s instead of %s (choose with --best-metric "
                            "%sNAME)", self.metric, cfg.best_metric, BIN_PREFIX)

    def run(self, model, state: TrainState) -> dict[str, Any]:
        """Validate ``model`` (eval mode inside); updates state.best_* on every rank; returns the value and best."""
        from accelerate.utils import broadcast_object_list

        from ..eval.embed import embed_dataset

        t0 = time.time()
        emb = labels = None
        # Workers shielded like training's: a SIGTERM to the process group during validation must let the rank
        # finish it, checkpoint and exit 143, not kill the workers under it (training/preemption.py).
        options = dict(batch_size=self.cfg.val_batch_size, num_workers=self.cfg.num_workers,
                       accelerator=self.accelerator, progress=False, worker_init_fn=shielded_worker_init())
        with self.accelerator.autocast():
            if self.dataset is not None:
                emb, labels = embed_dataset(model, self.dataset, **options)
            # Each set draws nothing from the RNGs (embed_bin restores them): resume stays bitwise exact.
            embedded = [embed_bin(model, b, self.bin_transform, **options) for b in self.bins]
        payload = [None]
        if self.accelerator.is_main_process:
            payload = [self._score(model, state, emb, labels, embedded, t0)]
        broadcast_object_list(payload, from_process=0)
        state.best_value, state.best_step = payload[0]["best_value"], payload[0]["best_step"]
        return payload[0]

    def _score(self, model, state: TrainState, emb, labels, embedded, t0: float) -> dict[str, Any]:
        from ..eval.pipeline import evaluate

        cfg = self.cfg
        metrics: dict[str, Any] = {}
        if emb is not None:
            metrics = evaluate({"embeddings": emb, "labels": labels, "paths": self.dataset.paths,
                                "classes": self.dataset.classes, "meta": {"data": cfg.data, "split": cfg.val_split}})
            if self.probe is not None:
                metrics["distillation"] = self.probe(emb)
        if self.bins:
            metrics["bin"] = {b.name: bin_metrics(e, b.issame, xnorm=xnorm, name=b.name, file=b.path)
                              for b, (e, xnorm) in zip(self.bins, embedded)}
        value = selection_value(metrics, self.metric)
        if value is None:
            log.warning("validation metric %s undefined (too few pairs); selecting by auc", self.metric)
            value = selection_value(metrics, "auc")
        improved = state.best_value is None or value > state.best_value
        if improved:
            state.best_value, state.best_step = value, state.step
            self.checkpointer.export(model, cfg.model, "best", {"step": state.step, "epoch": state.epoch,
                                                                 "selected_by": self.metric, "value": value,
                                                                 "metrics": metrics})
        seconds = time.time() - t0
        values: dict[str, Any] = {"epoch": state.epoch}
        summary = []
        if "verification" in metrics:
            v, i = metrics["verification"], metrics["identification"]
            values.update({"val/auc": v["auc"], "val/eer": v["eer"], "val/tar_at_far_1e-03": v["tar_at_far"]["1e-03"],
                           "val/rank1": i["rank1"], "val/map_at_r": i["map_at_r"]})
            summary.append(f"AUC {v['auc']:.4f}, EER {v['eer']:.4f}, TAR@FAR=1e-3 {_rounded(v['tar_at_far']['1e-03'])}, "
                           f"rank-1 {i['rank1']:.4f}")
        if metrics.get("distillation", {}).get("teacher_cosine") is not None:
            values["val/teacher_cosine"] = metrics["distillation"]["teacher_cosine"]
            summary.append(f"student-teacher cosine {metrics['distillation']['teacher_cosine']:.4f}")
        for name, m in metrics.get("bin", {}).items():
            values.update({f"bin/{name}/accuracy": m["accuracy_mean"], f"bin/{name}/accuracy_std": m["accuracy_std"],
                           f"bin/{name}/auc": m["auc"], f"bin/{name}/eer": m["eer"],
                           f"bin/{name}/tar_at_far_1e-03": m["tar_at_far"]["1e-03"], f"bin/{name}/xnorm": m["xnorm"]})
            summary.append(bin_summary_line(name, m))
        # bin:NAME -> val/best_bin/NAME: a colon is no tag character for every tracker.
        values.update({f"val/best_{self.metric.replace(':', '/')}": state.best_value, "val/seconds": seconds})
        self.logger.log(values, step=state.step)
        if "verification" in metrics:
            self._log_roc(metrics, state.step)
        log.info("validation at step %d: %s (%.1fs)%s", state.step, "; ".join(summary), seconds,
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


def _rounded(x: Any) -> str:
    """A metric for the log: 4 decimals, or "n/a" (TAR@FAR has no value when too few pairs reach that FAR)."""
    return "n/a" if x is None else f"{x:.4f}"
