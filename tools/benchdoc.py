"""Shared by the benchmarks: timing (best of interleaved repeats, CPU time with children), the LFW data they
read (../shared/data, credited in their reports), servers they start on a free localhost port, and replacing one
'## ' section of docs/benchmarks.md."""

from __future__ import annotations

import os
import resource
import subprocess
import time
from pathlib import Path
from typing import Callable

from facesiam.testing import free_port  # noqa: F401  re-exported: the bench tools' servers bind to it

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
LFW = REPO.parent / "shared" / "data" / "lfw-devtrain"  # Labeled Faces in the Wild (Huang et al., 2007)


def cpu_seconds() -> float:
    """User + system time of this process and of its finished (joined) children, e.g. pool and loader workers."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def lfw_subset(target: Path, images: int) -> Path | None:
    """Whole LFW identities in name order until ``images`` images, as symlinks (nothing copied); None without LFW."""
    if not LFW.is_dir():
        return None
    target.mkdir(parents=True)
    count = 0
    for person in sorted(p for p in LFW.iterdir() if p.is_dir()):
        (target / person.name).symlink_to(person, target_is_directory=True)
        count += sum(1 for _ in person.iterdir())
        if count >= images:
            break
    return target


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its threads so far (Linux /proc; it need not have exited)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180, path: str = "/healthz",
               poll: float = 0.2) -> None:
    """Until ``url`` + ``path`` answers 200, asked every ``poll`` seconds (SystemExit when the server exits or the
    time is up)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(poll)
    raise SystemExit(f"{url}{path} did not answer 200 within {timeout}s")


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
