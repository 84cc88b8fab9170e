"""The house rules, checked by reading every module's imports and functions (docs/architecture.md).

Floors, imports only downward: commands -> training, service -> eval -> the library (config, model, losses, data,
faces, augment, ...) -> fileio, errors. Inside the library, rooms use each other, but never in a circle: no two
rooms import each other (data/ never imports faces/ or augment/), and no module imports itself round a loop,
lazy imports inside functions included (imports under ``if TYPE_CHECKING:`` are annotations, not imports, and
are left out). Only training/ and eval/embed.py touch Accelerate; argparse lives in commands/ only; no function
is over MAX_FUNCTION_LINES lines.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

from .conftest import REPO

PACKAGE = REPO / "facesiam"
# training/, service/ and curate/ use eval/ (validation is evaluate(...); the service's gallery and embedder), never the
# other way round; everything else in facesiam/ is the library floor (1)
# quantize: the int8 export, judged by eval's verification metrics
FLOOR = {"commands": 4, "fit": 3.5, "training": 3, "service": 3, "curate": 3, "quantize": 3, "eval": 2}  # fit: the
# staged job over them
BOTTOM = {"fileio", "errors"}  # import nothing of facesiam's
ACCELERATE_ALLOWED = ("training/", "eval/embed.py")
MAX_FUNCTION_LINES = 100
# Functions allowed over the limit, each with the issue that rebuilds it.
LONG_FUNCTIONS_ALLOWED: set[str] = set()


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _room(module: Path) -> str:
    rel = module.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _dotted(module: Path) -> str:
    parts = ("facesiam",) + module.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _runtime_nodes(tree: ast.AST):
    """Every node of the tree except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        stack += [child for child in ast.iter_child_nodes(node) if not _is_type_checking(child)]


def _imports(module: Path) -> list[tuple[str, int]]:
    """(absolute dotted name, line) of everything the module imports at run time, lazy imports inside functions
    included. ``from . import x`` yields the module ``pkg.x`` only when x is a module of the package."""
    package = _dotted(module) if module.name == "__init__.py" else _dotted(module).rsplit(".", 1)[0]
    found = []
    for node in _runtime_nodes(ast.parse(module.read_text(encoding="utf-8"), str(module))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            submodules = [f"{name}.{alias.name}" for alias in node.names if _is_module(f"{name}.{alias.name}")]
            if node.module or not submodules:
                found.append((name, node.lineno))
            found += [(sub, node.lineno) for sub in submodules]
    return found


def _is_module(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] != "facesiam":
        return False
    path = PACKAGE.joinpath(*parts[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _module_graph(modules: list[Path]) -> dict[str, set[str]]:
    """Module -> the facesiam modules it imports (a package means its __init__; a name inside a module, the
    module)."""
    graph: dict[str, set[str]] = {}
    for module in modules:
        edges = set()
        for name, _ in _imports(module):
            while name and not _is_module(name):
                name = name.rpartition(".")[0]
            if name.startswith("facesiam") and name != _dotted(module):
                edges.add(name)
        graph[_dotted(module)] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as a list of nodes (first == last), or [] when it has none."""
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            if state[nxt] == 0 and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if state[node] == 0 and (found := visit(node)):
            return found
    return []


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


def test_no_import_circles_between_modules():
    cycle = _cycle(_module_graph(_modules()))
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_no_import_circles_between_library_rooms():
    """Rooms of the library floor may use each other one way only (faces/ builds on data/, never the reverse)."""
    rooms: dict[str, set[str]] = defaultdict(set)
    for module, edges in _module_graph(_modules()).items():
        room = module.split(".")[1] if module.count(".") else module
        rooms[room] |= {edge.split(".")[1] for edge in edges if edge.count(".") and edge.split(".")[1] != room}
    cycle = _cycle(rooms)
    assert not cycle, "rooms that import each other: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_accelerate_and_argparse_stay_in_their_rooms(module):
    rel = module.relative_to(PACKAGE).as_posix()
    for name, line in _imports(module):
        top = name.split(".")[0]
        if top == "accelerate":
            assert rel.startswith(ACCELERATE_ALLOWED), f"{rel}:{line}: only training/ and eval/embed touch Accelerate"
        if top == "argparse":
            assert rel.startswith("commands/"), f"{rel}:{line}: argument parsing belongs in commands/"


def _long_functions(module: Path) -> list[str]:
    rel = module.relative_to(PACKAGE).as_posix()
    found = []
    for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"), str(module))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in LONG_FUNCTIONS_ALLOWED:
                found.append(f"{rel}:{node.lineno} {node.name} is {length} lines")
    return found


@pytest.mark.parametrize("module", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_is_over_the_limit(module):
    long = _long_functions(module)
    assert not long, f"over {MAX_FUNCTION_LINES} lines (split it into named steps): {'; '.join(long)}"


def _probe(text: str):
    """A module written into facesiam/data/ for the length of a with block."""
    import contextlib

    @contextlib.contextmanager
    def written():
        bad = PACKAGE / "data" / "_layout_probe.py"
        assert not bad.exists()
        bad.write_text(text)
        try:
            yield bad
        finally:
            bad.unlink()

    return written()


def test_the_checker_sees_a_violation():
    """The rules above would catch a library module that imports a command, hides Accelerate, grows a long
    function or closes a circle (the tests can fail)."""
    long_body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    with _probe("from typing import TYPE_CHECKING\nfrom ..commands import COMMANDS\nimport accelerate\n"
                "if TYPE_CHECKING:\n    from ..model import EmbeddingModel\n"
                f"def long():\n{long_body}") as bad:
        found = _imports(bad)
        assert ("facesiam.commands", 2) in found
        assert not any(name.startswith("facesiam.model") for name, _ in found)  # annotations only
        with pytest.raises(AssertionError, match="nothing imports the command floor"):
            test_imports_only_go_down(bad)
        with pytest.raises(AssertionError, match="Accelerate"):
            test_accelerate_and_argparse_stay_in_their_rooms(bad)
        with pytest.raises(AssertionError, match="over 100 lines"):
            test_no_function_is_over_the_limit(bad)
    # faces/record imports data/format, so data/ importing faces/ (even lazily) closes a circle of rooms
    with _probe("def f():\n    from ..faces import record\n"):
        with pytest.raises(AssertionError, match="rooms that import each other: (data -> faces|faces -> data)"):
            test_no_import_circles_between_library_rooms()
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    graph = _module_graph(_modules())
    assert "facesiam.data.format" in graph["facesiam.data.writer"]
    graph["facesiam.data.format"] = graph["facesiam.data.format"] | {"facesiam.data.writer"}
    assert _cycle(graph) == ["facesiam.data.format", "facesiam.data.writer", "facesiam.data.format"]


def test_no_tool_imports_a_test_module():
    """Benchmarks and tools stand on their own: what they share with the tests lives in the package
    (facesiam/testing/: the servers both start), never in tests/."""
    offenders = []
    for tool in sorted((REPO / "tools").glob("*.py")):
        for node in ast.walk(ast.parse(tool.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{tool.name}: {name}" for name in names if name == "tests" or name.startswith("tests.")]
    assert not offenders, offenders
