"""Staged jobs (fit, demo): a list of stages, each with its inputs' fingerprint and its outputs, run in order.

    job = StagedJob(RUN)                                   # RUN/stages.json records every stage's state
    job.run([Stage("align", {"photos": ..., "seed": 0}, [RUN / "shards"], align), ...])

A stage whose recorded fingerprint matches and whose outputs all exist is done: it is skipped and its recorded
result is reused. A stage recorded as running with the same fingerprint was interrupted: it runs again over its
outputs, and continues (each stage's ``run`` resumes its own work: training from its newest checkpoint, the teacher
pass from its cached chunks). A stage whose fingerprint changed starts over (its outputs are deleted first). A
stage's fingerprint covers its own inputs and the previous stage's fingerprint, so redoing one stage redoes all
after it. Written by hand: the workflow engines that do this (snakemake, luigi, prefect) bring a scheduler and a
file-target model far larger than a handful of in-process stages need.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .fileio import write_json

STATE_FILE = "stages.json"
STATE_FORMAT = "facesiam-stages"


@dataclass
class Stage:
    """One step of a staged job."""

    name: str
    inputs: dict
    """JSON-able description of everything the stage's result depends on (options, input files' hashes)."""
    outputs: Sequence[Path]
    """Files or folders the stage makes; all must exist for it to count as done."""
    run: Callable[[dict], dict]
    """Does the work, given the results of the stages before it ({name: result}); returns a JSON-able result
    (``result["summary"]``: one line for the summary table)."""
    fresh: bool = False
    """Delete the outputs before running an interrupted stage too (its work cannot continue, only restart)."""


def fingerprint(inputs: Any, previous: str = "") -> str:
    """sha256 of the inputs (canonical JSON) and the previous stage's fingerprint."""
    text = json.dumps({"inputs": inputs, "previous": previous}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@dataclass
class StagedJob:
    """Runs stages in order, recording each one's state in FOLDER/stages.json (written atomically)."""

    folder: Path
    say: Callable[[str], None] = print
    state: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        path = self.folder / STATE_FILE
        loaded = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        self.state = loaded if loaded.get("format") == STATE_FORMAT else {"format": STATE_FORMAT, "stages": {}}

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / STATE_FILE, self.state)

    def status(self, stage: str) -> Optional[str]:
        """done | running | None (never started)."""
        return (self.state["stages"].get(stage) or {}).get("status")

    def run(self, stages: Sequence[Stage]) -> dict[str, dict]:
        """Run (or skip) every stage; returns {name: result}, each with ``seconds`` and ``skipped``."""
        results: dict[str, dict] = {}
        previous = ""
        for k, stage in enumerate(stages, 1):
            key = fingerprint(stage.inputs, previous)
            previous = key
            record = self.state["stages"].get(stage.name) or {}
            same = record.get("fingerprint") == key
            head = f"[{k}/{len(stages)}] {stage.name}"
            if same and record.get("status") == "done" and all(Path(p).exists() for p in stage.outputs):
                results[stage.name] = {**record["result"], "seconds": record.get("seconds", 0.0), "skipped": True}
                self.say(f"{head}: done earlier, skipped ({record['result'].get('summary', '')})")
                continue
            if same and record.get("status") == "running" and not stage.fresh:
                self.say(f"{head}: interrupted earlier, continuing")
            else:
                for path in stage.outputs:  # a changed input (or a stage that cannot continue): start over
                    _remove(Path(path))
                self.say(f"{head}: starting")
            spent = float(record.get("seconds", 0.0)) if same else 0.0
            self.state["stages"][stage.name] = {"fingerprint": key, "status": "running", "seconds": spent}
            self._save()
            t0 = time.perf_counter()
            result = stage.run(results)
            seconds = spent + time.perf_counter() - t0  # an interrupted stage's earlier time counts too
            self.state["stages"][stage.name] = {"fingerprint": key, "status": "done", "seconds": round(seconds, 2),
                                                "result": result}
            self._save()
            results[stage.name] = {**result, "seconds": seconds, "skipped": False}
            self.say(f"{head}: done in {seconds / 60:.1f} min ({result.get('summary', '')})")
        return results
