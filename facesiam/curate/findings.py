"""A finding: one thing the doctor found wrong with a data set, and findings.jsonl, one finding per line.

Paths are relative to the data set's root as its listing gives them (ImageFolder: ``identity/photo.jpg``; shards:
the source path recorded in the shard index), so ``make_shards --exclude findings.jsonl`` and ``doctor --apply``
act on the user's own files. A user reviews report.html, deletes the lines they disagree with, and applies the rest.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from ..errors import InputError
from ..fileio import write_text

# photo kinds come from the face detector and the aligned crop; the rest compare photos through the model
PHOTO_KINDS = ("unreadable", "no_face", "several_faces", "small_face", "cut_off", "blurred", "low_confidence")
PAIR_KINDS = ("duplicate", "near_duplicate", "wrong_label", "same_person")
KINDS = PHOTO_KINDS + PAIR_KINDS
ACTIONS = ("quarantine", "merge", "review")


@dataclass
class Finding:
    """One problem. ``suspects`` are the files ``--apply quarantine`` moves out (a subset of ``files``)."""

    kind: str
    """One of KINDS."""
    files: list[str]
    """Every photo the finding is about, relative to the data root."""
    identities: list[str]
    """Their identities (for same_person: the identities that look like one person)."""
    score: float
    """How sure, higher is surer; comparable within a kind (its meaning is in ``reason``)."""
    action: str
    """What the doctor suggests: "quarantine" the suspects, "merge" the identities, or "review" by eye."""
    suspects: list[str] = field(default_factory=list)
    """The photos to move out when the action is applied."""
    compared_with: list[str] = field(default_factory=list)
    """Photos shown beside the suspects on the contact sheet (what the decision was made against)."""
    reason: str = ""
    """One line for people."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"unknown finding kind {self.kind!r}: one of {', '.join(KINDS)}")
        if self.action not in ACTIONS:
            raise InputError(f"unknown action {self.action!r}: one of {', '.join(ACTIONS)}")

    def to_json(self) -> str:
        data = asdict(self)
        data["score"] = round(float(self.score), 5)
        return json.dumps(data, ensure_ascii=False)


def write_findings(path: str | os.PathLike, findings: Iterable[Finding]) -> Path:
    """findings.jsonl, atomically."""
    return write_text(path, "".join(f.to_json() + "\n" for f in findings))


def read_findings(path: str | os.PathLike) -> list[Finding]:
    """The findings of a findings.jsonl (blank lines skipped); a bad line is a one-line error naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / "findings.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"findings file {path} not found; make it with facesiam doctor DATA --out REPORT")
    findings = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            findings.append(Finding(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as err:
            raise InputError(f"{path}:{number}: not a finding ({err}); write one JSON object per line as "
                             "facesiam doctor does") from None
    return findings


def suspects(findings: Iterable[Finding], kinds: Optional[Iterable[str]] = None) -> list[str]:
    """The files the quarantine action of ``findings`` (of ``kinds``, default all) moves, each once, in order."""
    wanted = set(kinds) if kinds is not None else None
    seen: dict[str, None] = {}
    for f in findings:
        if f.action == "quarantine" and (wanted is None or f.kind in wanted):
            seen.update(dict.fromkeys(f.suspects))
    return list(seen)
