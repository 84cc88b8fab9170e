"""Resumable checkpoints and the run directory's model exports.

    RUN/checkpoints/step-N/   accelerator.save_state (model, optimizer, scheduler, scaler, RNG, EMA)
                              + train_state.json (TrainState: the loop's position, in a file facesiam names itself)
                              + centres-RANK-of-WORLD.pt per rank with Partial FC (each rank's class centres and
                              their optimizer state; restored onto any world size, re-sharded)
    RUN/best/, RUN/final/     exported models (model.safetensors + config.json) for inference

A checkpoint is written into ``.tmp-step-N`` and renamed when complete, so a crash (kill -9 included) at any
moment leaves only complete ``step-N`` directories; ``--resume latest`` takes the newest. Exports go through
fileio's staged directories. A resume on the same world size is exact; on another one (an elastic resize) the
epoch continues with the chunks its steps so far did not take, re-dealt over the new world size (TrainState's
``earlier_stretches``; the sampler's ``set_epoch(..., earlier=...)``), so no sample of the epoch is replayed or skipped.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import InputError
from ..fileio import replace_directory, write_text
from ..model import export_model

log = logging.getLogger("facesiam.train")

STATE_FILE = "train_state.json"  # TrainState; found by its own name, not by the order of Accelerate's registrations
CENTRES_FILE = "centres-{rank}-of-{world}.pt"


@dataclass
class TrainState:
    """The loop's own position, saved with every checkpoint (Accelerate saves model/optimizer/scheduler/RNG)."""

    step: int = 0                 # optimizer steps taken
    epoch: int = 0                # current epoch (0-based)
    batches_in_epoch: int = 0     # sampler batches already consumed in this epoch (the sampler position)
    world_size: int = 1           # processes that wrote this state (to map the position onto another world size)
    batch_size: int = 0           # per-process batch size that wrote this state
    skipped_steps: int = 0        # optimizer steps skipped for a non-finite loss/gradient, in total
    best_value: Optional[float] = None  # best validation value of cfg.best_metric so far
    best_step: Optional[int] = None
    # An elastic resize mid-epoch: this epoch's stretches on other world sizes, [world_size, batch_size, batches]
    # oldest first; batches_in_epoch then counts within the re-dealt rest of the epoch. Empty at each epoch's start.
    earlier_stretches: list[list[int]] = field(default_factory=list)
    steps_offset: int = 0         # optimizer steps the run takes beyond epochs x steps per epoch (set at a resize)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def read_train_state(checkpoint: Path) -> TrainState:
    """The loop's position saved in a checkpoint directory."""
    path = Path(checkpoint) / STATE_FILE
    try:
        return TrainState(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        if (Path(checkpoint) / "custom_checkpoint_0.pkl").is_file():  # facesiam before 2026-12-07
            raise InputError(f"--resume {checkpoint}: written by an older facesiam (its position is in "
                             f"custom_checkpoint_0.pkl, not {STATE_FILE}); resume it with that version, or start "
                             f"from the run's best/ or final/ with --pretrained RUN/best") from None
        raise InputError(f"--resume {checkpoint}: not a complete facesiam checkpoint (no {STATE_FILE}); pass a "
                         f"RUN/checkpoints/step-N directory or --resume latest") from None
    except (ValueError, TypeError) as err:
        raise InputError(f"{path}: not a facesiam train state ({err}); resume from another checkpoint") from None


def find_checkpoint(run: Path, resume: Optional[str]) -> Optional[Path]:
    """--resume latest|PATH -> a checkpoint directory (None: start fresh)."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(run)
        if not ckpts:
            log.warning("--resume latest: no checkpoint in %s; starting from scratch", Path(run) / "checkpoints")
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    read_train_state(path)  # a one-line error now, not a traceback after the data and model were built
    return path


def resume_state(state: TrainState, world_size: int, batch_size: int,
                 steps_left: Callable[[int, list[list[int]], int], int], steps_per_epoch: int, epochs: int) -> float:
    """Continue a checkpoint's ``state`` (in place) on ``world_size`` processes of ``batch_size``; returns the ratio of
    its global batch to this one (1.0: the same world size, an exact resume: nothing changes).

    On another world size (an elastic resize) the stretch it took of the epoch joins ``earlier_stretches`` and the
    rest of the epoch is re-dealt over this one (back on the size of the stretch before, with nothing taken since,
    that stretch's plan simply continues). A step stays one optimizer step, on whatever world size takes it;
    ``steps_offset`` makes the run's length (epochs x ``steps_per_epoch`` + offset, steps_per_epoch on this world
    size) end with its last epoch. ``steps_left(epoch, earlier, batch)``: the optimizer steps of that epoch's
    re-dealt rest on this world size from micro-batch ``batch`` on.
    """
    if (state.world_size, state.batch_size) == (world_size, batch_size):
        return 1.0
    earlier = [list(s) for s in state.earlier_stretches]
    if state.batches_in_epoch:
        earlier.append([state.world_size, state.batch_size, state.batches_in_epoch])
    position = earlier.pop()[2] if earlier and earlier[-1][:2] == [world_size, batch_size] else 0
    (log.warning if earlier else log.info)(
        "resuming a %d-process checkpoint on %d process(es) %s: the rest of the epoch is re-dealt over them (no "
        "sample replayed or skipped); per-step lr schedules continue by samples seen", state.world_size, world_size,
        "mid-epoch" if earlier else "at an epoch's start")
    ratio = state.world_size * state.batch_size / (world_size * batch_size)
    state.earlier_stretches, state.batches_in_epoch = earlier, position
    state.world_size, state.batch_size = world_size, batch_size
    rest = steps_left(state.epoch, earlier, position)
    state.steps_offset = state.step + rest - (state.epoch + 1) * steps_per_epoch
    return ratio


def list_checkpoints(run: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (half-written ``.tmp-step-N`` directories are not listed)."""
    ckpts = [p for p in (Path(run) / "checkpoints").glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(ckpts, key=lambda p: int(p.name[5:]))


class Checkpointer:
    """Saves, keeps the newest K of, finds and restores checkpoints; exports best/ and final/ (main process)."""

    def __init__(self, accelerator, run: Path, keep: int, state: TrainState, alignment: Optional[dict] = None,
                 centres=None, optimizer=None):
        self.accelerator = accelerator
        self.state = state  # the loop's position, saved beside Accelerate's state
        self.run = Path(run)
        self.keep = max(1, keep)
        self.alignment = alignment  # the training data's face alignment: recorded in every export's config.json
        # Partial FC's sharded centres (partial_fc.PartialFC) and the optimizer holding their state: saved by every
        # rank beside accelerate's state, which holds the main process's only
        self.centres, self.optimizer = centres, optimizer

    def save(self, step: int) -> Path:
        """accelerator.save_state into a temporary directory, renamed when complete; keep the newest K."""
        acc = self.accelerator
        ckdir = self.run / "checkpoints"
        final, tmp = ckdir / f"step-{step}", ckdir / f".tmp-step-{step}"
        if acc.is_main_process:
            ckdir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            write_text(tmp / STATE_FILE, json.dumps(asdict(self.state), indent=1))
        if self.centres is not None:
            torch.save(self.centres.shard_state(self.optimizer), tmp / CENTRES_FILE.format(
                rank=acc.process_index, world=acc.num_processes))
        acc.wait_for_everyone()
        if acc.is_main_process:
            replace_directory(tmp, final)
            for old in list_checkpoints(self.run)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    def latest(self) -> Optional[Path]:
        ckpts = list_checkpoints(self.run)
        return ckpts[-1] if ckpts else None

    def restore(self, path: Path) -> None:
        """Load everything registered with the accelerator (the train state is read before: resume_state)."""
        acc, state = self.accelerator, self.state
        acc.load_state(str(path))
        if self.centres is not None:
            self._restore_centres(path)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, state.step, state.epoch,
                 state.batches_in_epoch)

    def _restore_centres(self, path: Path) -> None:
        """This rank's Partial FC centres and their optimizer state, from the shards of whatever world size saved
        (only its own file when that world size is this run's: at a million identities each file is gigabytes)."""
        acc = self.accelerator
        own = path / CENTRES_FILE.format(rank=acc.process_index, world=acc.num_processes)
        files = [own] if own.is_file() else sorted(path.glob(CENTRES_FILE.format(rank="*", world="*")))
        if not files:
            raise InputError(f"--resume {path}: the run uses loss.partial_fc but the checkpoint holds no class centre "
                             f"shards ({CENTRES_FILE.format(rank='R', world='W')}); resume it without partial_fc")
        self.centres.load_shards([torch.load(f, map_location="cpu", weights_only=True) for f in files],
                                 self.optimizer)

    def export(self, model, model_cfg, name: str, extra: dict) -> Path:
        """RUN/<name>/ (best or final): an inference export, swapped in complete (main process only)."""
        return export_model(model, model_cfg, self.run / name, extra=extra, alignment=self.alignment)
