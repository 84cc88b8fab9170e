"""What a run reports: RUN/metrics.jsonl, TensorBoard and W&B (offline unless opted in), throughput windows.

Main process only. Face images are biometric data: no image is ever logged, and W&B uploads nothing unless
``--wandb online``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from ..config import TrainConfig, to_dict
from ..fileio import write_json, write_text

log = logging.getLogger("facesiam.train")


def flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a/b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


class RunLogger:
    """metrics.jsonl plus the Accelerate trackers (TensorBoard, W&B); every method is a no-op off the main process."""

    def __init__(self, accelerator, cfg: TrainConfig, run: Path, *, resumed_step: Optional[int] = None):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = Path(run) / "metrics.jsonl"
        if not self.main:
            accelerator.log_with = []
            return
        if resumed_step is not None:
            self._truncate(resumed_step)
        trackers = []
        if cfg.tensorboard:
            from accelerate.tracking import TensorBoardTracker

            trackers.append(TensorBoardTracker("tensorboard", run))
        mode = cfg.wandb or os.environ.get("WANDB_MODE", "offline")
        if mode not in ("off", "disabled"):
            from accelerate.tracking import WandBTracker

            # Offline unless the user opts in: face data is biometric, and a run must not need a key.
            trackers.append(WandBTracker(cfg.wandb_project, mode=mode, dir=str(run), name=Path(run).name,
                                         config=to_dict(cfg)))
        accelerator.log_with = trackers
        if trackers:
            values = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat(to_dict(cfg)).items()}
            accelerator.init_trackers(cfg.wandb_project, config=values)

    def _truncate(self, step: int) -> None:
        """On resume, forget what the interrupted run logged after its checkpoint (and a half-written last line)."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut off by the crash
                continue
        write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, values: dict[str, Any], step: int) -> None:
        if not self.main:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and v is not None}
        if self.accelerator.trackers:
            self.accelerator.log(scalars, step=step)

    def log_figure(self, name: str, figure, step: int) -> None:
        for tracker in self.accelerator.trackers if self.main else []:
            if tracker.name == "tensorboard":
                tracker.writer.add_figure(name, figure, step)
            elif tracker.name == "wandb":
                import wandb

                tracker.run.log({name: wandb.Image(figure)}, step=step)

    def summary(self, summary: dict, run: Path) -> None:
        if self.main:
            write_json(Path(run) / "summary.json", summary)


DATA_WAIT_WARNING = 0.10  # above this share of a log window spent waiting for batches, the loader is the limit


class StepWindow:
    """Counters of the steps since the last log: time, time spent waiting for data, and the loss summed on the
    device (read only at log steps: a host sync per step would stall a GPU). ``clock``: seconds, monotonic (tests
    pass a fake one)."""

    def __init__(self, device: torch.device, *, clock: Callable[[], float] = time.perf_counter):
        self.device = device
        self.clock = clock
        self.windows = 0
        self.warned_slow_data = False
        self.reset()

    def reset(self) -> None:
        self.t0, self.wait, self.steps = self.clock(), 0.0, 0
        self.loss = torch.zeros((), device=self.device)

    def timed(self, batches: Iterable) -> Iterator:
        """Yield from ``batches``, counting the time spent waiting for each as data wait."""
        it = iter(batches)
        while True:
            t = self.clock()
            try:
                item = next(it)
            except StopIteration:
                return
            self.wait += self.clock() - t
            yield item

    def stats(self, images_per_step: int, processes: int) -> dict[str, float]:
        """Mean loss, images/s (all processes and per process) and the data-wait fraction of the window."""
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = self.steps * images_per_step / elapsed
        self.windows += 1
        return {"loss": float(self.loss) / max(self.steps, 1), "images_per_s": rate * processes,
                "images_per_s_per_process": rate, "data_wait_fraction": self.wait / elapsed}

    def slow_data_warning(self, stats: dict[str, float], num_workers: int) -> Optional[str]:
        """Once per run, a warning when a window (after the first, which includes the loader's start) waited for
        data more than DATA_WAIT_WARNING of its time."""
        if self.warned_slow_data or self.windows < 2 or stats["data_wait_fraction"] <= DATA_WAIT_WARNING:
            return None
        self.warned_slow_data = True
        return (f"{stats['data_wait_fraction']:.0%} of the last log window waited for data: the loader, not the "
                f"model, sets the speed; raise --num-workers (now {num_workers}) if there are idle cores, move the "
                f"augmentation onto the GPU (--augment-device cuda) when cores are short, or pack images no larger "
                f"than the model needs (make_shards --resize PIXELS) so each costs less to decode")
