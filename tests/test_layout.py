"""The layout's rules, read from the code itself (issue 29): no import circle (imports inside
functions count) between modules or between subpackages, no import of another module's private names, modules <= 400 lines and functions
<= 80 lines, and every module says in its first docstring line what it owns."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("annotator", "exporters")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def module_files() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = module_files()


def imports(name: str, path: Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import of the project's own modules,
    wherever it stands in the file (top level, inside functions, under TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub, "", node.lineno) if sub in MODULES else (base, a.name, node.lineno))
    return [(m, n, line) for m, n, line in found if m.split(".")[0] in PACKAGES]


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in imports(name, path):
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target != name and target in MODULES:
                edges[name].add(target)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle_and_a_private_import():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_even_through_imports_inside_functions():
    assert circles(graph()) == []


def room(module: str) -> str:
    """The subpackage a module lives in (exporters is one room; cli, config, tasks, ... are their own)."""
    parts = module.split(".")
    return "exporters" if parts[0] == "exporters" else ".".join(parts[:2])


def test_no_circle_between_subpackages():
    """The rooms stand on each other: a subpackage never imports one that imports it back."""
    rooms: dict[str, set[str]] = {}
    for a, targets in graph().items():
        rooms.setdefault(room(a), set()).update(room(b) for b in targets if room(b) != room(a))
    for targets in list(rooms.values()):
        for b in targets:
            rooms.setdefault(b, set())
    assert circles(rooms) == []


def test_no_module_imports_another_modules_private_names():
    crossing = [f"{name}:{line} imports {target}.{imported}" for name, path in MODULES.items()
                for target, imported, line in imports(name, path)
                if imported.startswith("_") and not imported.startswith("__") and target != name]
    assert crossing == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_sizes_and_the_opening_line(name):
    path = MODULES[name]
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{name}: over {MAX_MODULE_LINES} lines"
    tree = ast.parse(source)
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == [], f"{name}: functions over {MAX_FUNCTION_LINES} lines"
    doc = ast.get_docstring(tree)
    assert doc and doc.strip(), f"{name}: no docstring saying what it owns"


def literals(path: Path) -> list[tuple[int, str]]:
    """The string constants of a module's code (docstrings left out: prose may name a token)."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs]


def test_location_tokens_and_task_tokens_are_written_in_one_place():
    """`<loc_N>` (its spelling, pattern and vocabulary) lives in model/sequence.py, task tokens such
    as `<OD>` in tasks.py; everything else asks them."""
    import re

    token = re.compile(r"<[A-Z][A-Z_]+>")
    homes = {"<loc_": "annotator.model.sequence", "task token": "annotator.tasks"}
    found = [f"{name}:{line} {value[:40]!r}" for name, path in MODULES.items() for line, value in literals(path)
             if ("<loc_" in value and name != homes["<loc_"]) or (token.search(value) and name != homes["task token"])]
    assert found == []
