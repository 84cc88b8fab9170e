"""Preemption: a SIGTERM or SIGUSR1 makes every rank finish its step, checkpoint that step and exit with status 143.

Slurm (``--signal=B:USR1@120``, forwarded by launch/slurm.sh; ``scancel``; the time limit), Kubernetes (a pod's
termination) and torchrun / accelerate launch (which pass the signal they get on to their workers) all stop a job
with a signal and SIGKILL it after a grace period. While a ``Preemption`` is entered (``Trainer.train``), these
signals only set a flag; the loop asks ``should_stop`` after every optimizer step.

How the ranks agree: the signal may reach the ranks at different moments, or only one of them, so every rank
all-reduces its flag (a one-element tensor) at every step boundary and all see the same sum after the same step:
all checkpoint that step together and exit. Every step rather than every k steps: it costs one 4-byte all-reduce and
one host sync per step (tens of microseconds on NCCL, plus the next step's first kernel launch no longer hiding
behind the optimizer's kernels: well under 1 % of a step; train_step already waits for one such all-reduce, its
non-finite check), and the grace period then only has to cover one step, plus a validation when one is due, plus one
checkpoint. Every k steps would add k - 1 steps to that.

The exit status, ``PREEMPTED_EXIT_CODE`` = 143 = 128 + SIGTERM, is what shells, Kubernetes and ``accelerate launch``
report for a process stopped by SIGTERM, so every layer already reads it as "stopped from outside, start me again":
the Kubeflow training operator's ``restartPolicy: ExitCode`` retries 143 (with 130, 137 and 138; newer operators any
code >= 128) and takes 1 (a facesiam error) and 2 (a bad flag) as permanent; Slurm can requeue on it
(``RequeueExit=143`` in slurm.conf; launch/slurm.sh requeues itself). A rank killed by a SIGTERM before it could
install the handler ends with the same status, which is right too: ``--resume latest`` takes the newest checkpoint
either way. ``subprocess`` tells them apart (143 is a clean stop, -15 a kill).
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
from typing import Any, Callable, Optional

import torch

log = logging.getLogger("facesiam.train")

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143
STOP_SIGNALS = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGUSR1") if hasattr(signal, s))  # Windows: no USR1


class Preempted(SystemExit):
    """Raised by every rank after the preemption checkpoint: the process exits with status 143, no traceback."""

    def __init__(self, step: int):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step


class Preemption:
    """``with Preemption() as p:`` SIGTERM/SIGUSR1 set ``p.signal`` instead of ending the process; ``p.should_stop``
    says, identically on every rank, whether any rank got one. Leaving the block restores the previous handlers."""

    def __init__(self) -> None:
        self.signal: Optional[signal.Signals] = None  # the first stop signal this process received
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is not threading.main_thread():  # Python only lets the main thread set handlers
            log.warning("training outside the main thread: SIGTERM/SIGUSR1 end the process without a checkpoint")
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._received)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _received(self, signum: int, frame) -> None:
        if self.signal is None:  # only a flag here: the handler may run in the middle of anything
            self.signal = signal.Signals(signum)

    def should_stop(self, accelerator) -> bool:
        """True on every rank when any rank has received a stop signal: one all-reduce of one number (a collective:
        every rank must call it at the same step)."""
        flag = torch.tensor([0.0 if self.signal is None else 1.0], device=accelerator.device)
        stop = accelerator.reduce(flag, "sum").item() > 0
        if self.signal is not None and stop:
            log.warning("process %d received %s", accelerator.process_index, self.signal.name)
        return stop


def shield_loader_workers(loader) -> None:
    """Make ``loader``'s worker processes ignore SIGTERM and SIGUSR1: the rank they serve decides when to stop.

    torchrun, Slurm and ``kill -- -PGID`` signal a rank's whole process group, workers included; a worker ended by
    that signal turns the rank's next batch into "DataLoader worker exited unexpectedly" instead of a clean stop.
    The rank ends its workers when the run ends (TrainData.close), and a worker whose rank died exits by itself.
    """
    loader.worker_init_fn = functools.partial(_ignore_stop_signals, loader.worker_init_fn)


def shielded_worker_init() -> Callable[[int], None]:
    """A worker_init_fn for loaders built elsewhere (validation's embedding loop): the same shield."""
    return functools.partial(_ignore_stop_signals, None)


def _ignore_stop_signals(init: Optional[Callable[[int], None]], worker_id: int) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if init is not None:
        init(worker_id)
