"""The house rules, checked by reading every module's imports (docs/architecture.md).

Floors, imports only downward: commands -> training -> eval -> the library (config, model, losses, data, ...)
-> fileio, errors. Only training/ and eval/embed.py touch Accelerate; argparse lives in commands/ only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import REPO

PACKAGE = REPO / "facesiam"
# training/ and service/ use eval/ (validation is evaluate(...); the service's gallery and embedder), never the
# other way round; everything else in facesiam/ is the library floor (1)
FLOOR = {"commands": 4, "training": 3, "service": 3, "eval": 2}
BOTTOM = {"fileio", "errors"}  # import nothing of facesiam's
ACCELERATE_ALLOWED = ("training/", "eval/embed.py")


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _room(module: Path) -> str:
    rel = module.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(module: Path) -> list[tuple[str, int]]:
    """(absolute dotted name, line) of everything the module imports, lazy imports inside functions included."""
    package = ".".join(("facesiam",) + module.relative_to(PACKAGE).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"), str(module))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found += [(name, node.lineno)]
            if not node.module:  # from . import x, y: each x is a module or a name of the package
                found += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _floor(room: str) -> int:
    return 0 if room in BOTTOM else FLOOR.get(room, 1)


@pytest.mark.parametrize("module", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_go_down(module):
    room = _room(module)
    for name, line in _imports(module):
        parts = name.split(".")
        if parts[0] != "facesiam" or len(parts) < 2 or parts[1] == "__init__":
            continue
        target = parts[1]
        if target == room:
            continue
        where = f"{module.relative_to(REPO)}:{line} imports {name}"
        assert target != "commands", f"{where}: nothing imports the command floor"
        # the library's modules use each other (model uses config); every other floor only looks down
        assert _floor(target) < _floor(room) or _floor(target) == _floor(room) == 1, f"{where}: imports must go down"


@pytest.mark.parametrize("module", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_accelerate_and_argparse_stay_in_their_rooms(module):
    rel = module.relative_to(PACKAGE).as_posix()
    for name, line in _imports(module):
        top = name.split(".")[0]
        if top == "accelerate":
            assert rel.startswith(ACCELERATE_ALLOWED), f"{rel}:{line}: only training/ and eval/embed touch Accelerate"
        if top == "argparse":
            assert rel.startswith("commands/"), f"{rel}:{line}: argument parsing belongs in commands/"


def test_the_checker_sees_a_violation(tmp_path):
    """The rules above would catch a library module that imports a command (the test can fail)."""
    bad = PACKAGE / "data" / "_layout_probe.py"
    assert not bad.exists()
    bad.write_text("from ..commands import COMMANDS\nimport accelerate\n")
    try:
        assert ("facesiam.commands", 1) in _imports(bad)
        with pytest.raises(AssertionError, match="nothing imports the command floor"):
            test_imports_only_go_down(bad)
        with pytest.raises(AssertionError, match="Accelerate"):
            test_accelerate_and_argparse_stay_in_their_rooms(bad)
    finally:
        bad.unlink()
