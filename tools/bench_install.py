"""Benchmark: the README's installs on a fresh machine, each in a new venv: `pip install -e .` (the main job's),
`pip install -e ".[dev]"` (the tests'), and the dev extra's resolution alone (`pip install --dry-run`, what .ci/run
bounds at 300 s). Goals (issue 41): dev <= 5 min, base <= 3 min.

    python tools/bench_install.py [--only base dev resolve] [--write-doc]

Wall time depends on the package index and on the disk (torch's CUDA build is ~5.5 GB unpacked); CPU time (user +
system of pip and its children) less so: both are reported. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time

from benchdoc import REPO, write_section  # tools/ is on sys.path when a tool runs as a script

HEADING = "## Install: the README's commands in a fresh venv (issue 41)"
CASES = {"base": ["-e", "."], "dev": ["-e", ".[dev]"], "resolve": ["--dry-run", "-e", ".[dev]"]}
GOALS = {"base": 180, "dev": 300, "resolve": 300}
TIMEOUT = 1800  # a resolver that backtracks for half an hour is a failure, not a number


def timed_install(args: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of ``pip install -q ARGS`` in a new venv made in a temporary folder."""
    import resource

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "venv", f"{tmp}/venv"], check=True, timeout=120)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run([f"{tmp}/venv/bin/pip", "install", "-q", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=TIMEOUT)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            raise SystemExit(f"pip install {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--write-doc", action="store_true", help=f"replace '{HEADING}' in docs/benchmarks.md")
    args = p.parse_args(argv)
    rows = []
    for name in args.only:
        wall, cpu = timed_install(CASES[name])
        verdict = "met" if wall <= GOALS[name] else "NOT met"
        rows.append(f"| `pip install {' '.join(CASES[name])}` | {wall / 60:.1f} min | {cpu / 60:.1f} min | "
                    f"<= {GOALS[name] // 60} min: {verdict} |")
        print(rows[-1], flush=True)
    text = (f"{HEADING}\n\n`python tools/bench_install.py --write-doc`, {datetime.date.today().isoformat()}, this "
            f"machine (2 shared cores; PyPI through its mirror, torch from the local wheel cache). Each in a new venv.\n\n"
            "| command | wall | CPU | goal |\n|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            "The dev extra pins boto3 and aiobotocore to one botocore window (pyproject.toml): left open, pip walked "
            "back through boto3's daily releases for 12+ minutes without installing anything.\n")
    if args.write_doc:
        write_section(HEADING, text)
    print(text)


if __name__ == "__main__":
    main()
