"""Local helper processes that end with the process that started them.

A command killed with SIGKILL (a user's kill -9, the OOM killer) would otherwise leave its ProcessPoolExecutor's
workers computing beside the rerun, then waiting forever for work: they read their tasks from a pipe that the
dead parent never closes. Used by the teacher's pass (training/teacher_pass.py) and the doctor's teacher on a
photo folder (curate/photos.py).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
from typing import Any, Callable, Optional


def die_with_parent(parent: int) -> None:
    """In a helper process: end it with SIGKILL when ``parent`` (the process that started it) dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):  # not Linux: a helper outlives a killed parent by the work it was given
        pass
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)


def _start(parent: int, initializer: Optional[Callable[..., Any]], initargs: tuple) -> None:
    die_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)


def helper_pool(count: int, initializer: Optional[Callable[..., Any]] = None,
                initargs: tuple = ()) -> concurrent.futures.ProcessPoolExecutor:
    """A ProcessPoolExecutor of ``count`` helpers that die with this process; ``initializer(*initargs)`` runs in
    each first (its arguments travel pickled)."""
    return concurrent.futures.ProcessPoolExecutor(count, initializer=_start,
                                                  initargs=(os.getpid(), initializer, initargs))
