"""Shared by the benchmarks: timing (best of interleaved repeats, CPU time with children), the LFW data they
read (../shared/data, credited in their reports) and replacing one '## ' section of docs/benchmarks.md."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
LFW = REPO.parent / "shared" / "data" / "lfw-devtrain"  # Labeled Faces in the Wild (Huang et al., 2007)


def cpu_seconds() -> float:
    """User + system time of this process and of its finished (joined) children, e.g. pool and loader workers."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def race(repeats: int, contenders: dict[str, Callable[[], object]]) -> dict[str, tuple[float, float]]:
    """Run the contenders interleaved `repeats` times (shared cores drift: each sees the same drift); best
    (wall seconds, CPU seconds) of each."""
    best = {name: (float("inf"), float("inf")) for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            wall, cpu = time.perf_counter(), cpu_seconds()
            fn()
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def write_section(heading: str, text: str, doc: Path = DOC) -> None:
    """Replace the section that starts with `heading` (create the file or append the section if missing)."""
    doc.parent.mkdir(exist_ok=True)
    old = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    start = old.find(heading + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + text + ("\n" + old[end + 1:] if end >= 0 else "")
    doc.write_text(new.rstrip("\n") + "\n", encoding="utf-8")
