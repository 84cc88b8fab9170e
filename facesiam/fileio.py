"""Crash-safe writes: nothing a run writes ever leaves a partial result where a good one was.

* ``atomic_write(path)``: one file (YAML, JSON, .npz, a pairs file, an index) is written to a temporary file
  beside it, flushed to disk and renamed over ``path`` only when complete; ``write_text`` and ``write_json``
  are the common cases.
* ``staged_directory(dst)``: a directory (shards, exported models, galleries, synthetic data sets) is built under
  a hidden temporary name and swapped in only when complete.

Readers see either the old complete file or directory or the new complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Optional


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, encoding: Optional[str] = "utf-8",
                 file_mode: int = 0o644) -> Iterator[IO]:
    """``with atomic_write(p) as f: f.write(...)`` -- ``p`` is replaced only if the block succeeds.

    ``mode`` is "w" (text) or "wb" (binary). The parent directory is created. The data is fsynced before the
    rename, so a crash (even kill -9 or power loss) leaves the old file or the new one, never a mix.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode)  # mkstemp makes 0600 files; results are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks: model weights and photos alike."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (UTF-8)."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, *, indent: Optional[int] = 2, **kwargs: Any) -> Path:
    """Write JSON atomically, ending with a newline."""
    return write_text(path, json.dumps(data, indent=indent, **kwargs) + "\n")


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


def recover_directory(dst: str | os.PathLike, *, marker: str, clean_staging: bool = False) -> bool:
    """Undo a replace_directory cut short between its two renames (kill -9, power loss): ``dst`` is missing but
    the old copy moved aside still holds ``marker`` (its completeness file) -> move it back. Returns True if it did.

    Either the old or the new copy is complete at any instant; this restores the old one (the write is lost, the
    directory is never). Old copies left beside a complete ``dst`` are removed; ``clean_staging`` also removes
    unfinished staging directories (``.NAME.tmp-*``): only for a caller that is the directory's one writer.
    """
    dst = Path(dst)
    recovered = False
    if not dst.exists():
        olds = sorted((p for p in dst.parent.glob(f".{dst.name}.old-*") if (p / marker).is_file()),
                      key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], dst)
            recovered = True
    if dst.exists():
        for leftover in dst.parent.glob(f".{dst.name}.old-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    if clean_staging:
        for leftover in dst.parent.glob(f".{dst.name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return recovered


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
