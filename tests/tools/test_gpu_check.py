"""tools/gpu_check.sh, the prepared GPU session, checked on CPU: its dry run finds every path, test file and tool flag
it names (so it cannot rot between GPU loans), and it fails loudly -- never passes vacuously -- when a path is
missing, a pytest step runs no test or skips its CUDA tests, a step fails, or a flag is unknown."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import REPO

SCRIPT = "tools/gpu_check.sh"
# Each --help starts a Python with torch; the dry run asks about a dozen tools and collects the GPU tests.
DRY_RUN_TIMEOUT = 600


def _env(**extra: str) -> dict[str, str]:
    """This interpreter's python3 first on PATH (the script calls python3), one thread per process."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", **extra}


def _dry_run(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, "--dry-run", *args], cwd=root, env=_env(), capture_output=True, text=True,
                          timeout=DRY_RUN_TIMEOUT)


def _helpers(tmp_path: Path, code: str, *args: str, dry_run: bool = False) -> subprocess.CompletedProcess:
    """Run bash CODE with the script's helpers sourced (not its main part), OUT in tmp_path; prints rc= and the
    failure count."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    wrapper = f'source {SCRIPT}; {code}; echo "rc=$? failures=$FAILURES"'
    env = _env(OUT=str(out), GPU_CHECK_DRY_RUN="1" if dry_run else "0")
    return subprocess.run(["bash", "-c", wrapper, "_", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def _failures(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith("GPU_CHECK FAILED:")]


def _tree_without(tmp_path: Path, missing: str) -> Path:
    """A copy of the repository's layout (top-level entries linked, the one holding MISSING copied) without MISSING."""
    root = tmp_path / "repo"
    root.mkdir()
    top = Path(missing).parts[0]
    for entry in REPO.iterdir():
        if entry.name == top:
            shutil.copytree(entry, root / entry.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif not entry.name.startswith("."):
            (root / entry.name).symlink_to(entry)
    (root / missing).unlink()
    return root


@pytest.mark.timeout(DRY_RUN_TIMEOUT + 30)
@pytest.mark.slow  # ~30 s: every tool of the script answers --help
def test_the_dry_run_finds_everything_it_names():
    proc = _dry_run(REPO)
    assert proc.returncode == 0 and not _failures(proc), proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "gpu_check dry run (all): every path, test file and tool flag it names is there" in proc.stdout


@pytest.mark.timeout(DRY_RUN_TIMEOUT + 30)
def test_the_dry_run_fails_when_a_test_file_it_runs_is_gone(tmp_path):
    """The rot this guards against: a GPU test file moved away, and the GPU step silently ran nothing. (Every PART
    runs the tests first; the smallest one keeps this test short.)"""
    root = _tree_without(tmp_path, "tests/augment/test_batch.py")
    proc = _dry_run(root, str(tmp_path / "out"), "partialfc")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "GPU_CHECK FAILED: missing path: tests/augment/test_batch.py (named in tools/gpu_check.sh)" in proc.stdout
    assert "GPU_CHECK FAILED: dry run: " in proc.stdout


def test_a_pytest_step_that_runs_no_test_fails(tmp_path):
    empty = tmp_path / "test_nothing.py"
    empty.write_text('"""No tests here."""\n')
    proc = _helpers(tmp_path, 'run_tests tests.txt 60 "$1"', str(empty))
    assert "rc=5 failures=1" in proc.stdout, proc.stdout + proc.stderr
    assert _failures(proc) == ["GPU_CHECK FAILED: tests.txt: pytest ran no test (exit status 5; see "
                               f"{tmp_path / 'out'}/tests.txt)"]
    assert (tmp_path / "out" / "failures.txt").read_text().startswith("tests.txt: pytest ran no test")
    # the dry run sees it before any GPU is lent: nothing to collect
    proc = _helpers(tmp_path, 'run_tests tests.txt 60 "$1"', str(empty), dry_run=True)
    assert "rc=5 failures=1" in proc.stdout, proc.stdout + proc.stderr
    assert _failures(proc) == [f"GPU_CHECK FAILED: tests.txt: no tests collected from {empty}"]


def test_a_pytest_step_whose_cuda_tests_skip_fails(tmp_path):
    """On the GPU machine a test skipped "needs CUDA" checked nothing (torch without CUDA, a wrong wheel)."""
    skipped = tmp_path / "test_gpu_only.py"
    skipped.write_text("import pytest\n\n\ndef test_cpu():\n    pass\n\n\n"
                       "@pytest.mark.skipif(True, reason='needs CUDA')\ndef test_gpu():\n    pass\n")
    proc = _helpers(tmp_path, 'run_tests tests.txt 60 "$1"', str(skipped))
    assert "rc=1 failures=1" in proc.stdout, proc.stdout + proc.stderr
    assert "CUDA tests were skipped on the GPU machine" in _failures(proc)[0]


def test_a_pytest_step_with_a_missing_file_fails_and_a_passing_one_does_not(tmp_path):
    passing = tmp_path / "test_fine.py"
    passing.write_text("def test_fine():\n    assert True\n")
    proc = _helpers(tmp_path, 'run_tests tests.txt 60 "$1"', str(passing))
    assert "rc=0 failures=0" in proc.stdout and not _failures(proc), proc.stdout + proc.stderr
    proc = _helpers(tmp_path, 'run_tests tests.txt 60 "$1" "$2"', str(passing), "tests/no_such_test.py")
    assert "rc=1 failures=1" in proc.stdout, proc.stdout + proc.stderr
    assert _failures(proc) == ["GPU_CHECK FAILED: missing path: tests/no_such_test.py (named in tools/gpu_check.sh)"]


def test_a_failing_step_and_an_unknown_flag_fail(tmp_path):
    proc = _helpers(tmp_path, "step broken.txt 30 bash -c 'echo out; exit 3'")
    assert "rc=3 failures=1" in proc.stdout, proc.stdout + proc.stderr
    assert _failures(proc)[0].startswith("GPU_CHECK FAILED: broken.txt: exit status 3")
    assert (tmp_path / "out" / "broken.txt").read_text() == "out\n"

    tool = tmp_path / "tool.py"
    tool.write_text("import argparse\np = argparse.ArgumentParser()\np.add_argument('--size')\np.parse_args()\n")
    proc = _helpers(tmp_path, 'check_flags "$1" --size 3 --size=4', str(tool))
    assert "failures=0" in proc.stdout and not _failures(proc), proc.stdout + proc.stderr
    proc = _helpers(tmp_path, 'check_flags "$1" --size 3 --sise 4', str(tool))
    assert _failures(proc) == [f"GPU_CHECK FAILED: {tool} has no option --sise (tools/gpu_check.sh passes it)"]


@pytest.mark.slow  # ~30 s: every tool of the script answers --help
def test_an_unknown_part_fails_and_the_iresnet50_part_dry_runs(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, str(tmp_path / "out"), "speeed"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "GPU_CHECK FAILED: unknown PART 'speeed'" in proc.stdout, proc.stdout
    proc = _dry_run(REPO, str(tmp_path / "out"), "iresnet50")  # not in "all": its own part
    assert proc.returncode == 0 and not _failures(proc), proc.stdout + proc.stderr


def test_every_cuda_only_test_runs_in_the_gpu_session():
    """A test that skips without CUDA checks something only on the lent GPU: its file must be one the session runs,
    and its skip reason "needs CUDA", which the session treats as a failure there."""
    script = (REPO / SCRIPT).read_text()
    cuda_only = re.compile(r"skipif\(\s*not\s+[\w.]*cuda\.is_available\(\)\s*,\s*reason=([\"'])(.*?)\1")
    problems, seen = [], set()
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        for match in cuda_only.finditer(path.read_text()):
            name = path.relative_to(REPO).as_posix()
            seen.add(name)
            if match.group(2) != "needs CUDA":
                problems.append(f"{name}: reason {match.group(2)!r}, not 'needs CUDA'")
            if name not in script:
                problems.append(f"{name}: has CUDA-only tests but {SCRIPT} does not run it")
    assert seen, "no CUDA-only test found: did the skip idiom change? (then change this pattern too)"
    assert not problems, "\n".join(sorted(set(problems)))
