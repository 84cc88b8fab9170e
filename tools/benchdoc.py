"""Shared by the benchmarks: replace one '## ' section of docs/benchmarks.md with fresh results."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


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
