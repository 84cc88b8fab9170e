"""Crash-safe writes: a directory is built under a hidden temporary name and swapped in only when complete.

Nothing a run writes (shards, exported models, galleries, synthetic data sets) may ever leave a partial result
where a good one was: readers see either the old complete directory or the new complete one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional


def replace_directory(staging: Path, dst: Path, *, last: Optional[str] = None) -> None:
    """Move the finished ``staging`` directory to ``dst``; an old ``dst`` is moved aside first, deleted after.

    An existing *empty* ``dst`` (a mount point, the current directory) is kept and filled instead, moving
    the entry named ``last`` (e.g. the metadata file that marks completeness) in after everything else.
    """
    staging, dst = Path(staging), Path(dst)
    if not dst.exists():
        os.replace(staging, dst)
    elif dst.is_dir() and not any(dst.iterdir()):
        for entry in sorted(staging.iterdir(), key=lambda p: p.name == last):
            shutil.move(str(entry), str(dst / entry.name))  # a rename, or a copy across file systems
        staging.rmdir()
    else:
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
        os.replace(staging, dst)
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_directory(dst: str | os.PathLike, *, last: Optional[str] = None) -> Iterator[Path]:
    """``with staged_directory(out) as tmp: write into tmp`` -- out is replaced only if the block succeeds."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700 directories; the result is meant to be shared
    try:
        yield tmp
        replace_directory(tmp, dst, last=last)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
