"""The package's structure, checked: one concept per folder holds only while nothing drifts back.

No import circles among ``pytest_mnnvl``'s modules (lazy imports inside functions count too: a circle that
only closes at run time is still a circle to a reader); ``plugin.py`` holds only hooks, fixtures and the
hook classes it registers; no docstring or comment sends the reader to a file outside this repository.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pytest_mnnvl"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in its body (relative imports resolved)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    graph[name].add(target if target in modules else base)
            elif isinstance(node, ast.Import):
                graph[name].update(alias.name for alias in node.names)
        graph[name] = {m for m in graph[name] if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_circles() -> None:
    assert cycles(import_graph(_modules())) == []


def test_the_circle_check_finds_a_circle() -> None:
    """The check itself can fail: a two-module circle, and one through a lazy import, are found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"x": {"y"}, "y": set()}) == []


def test_plugin_py_holds_only_hooks_fixtures_and_hook_classes() -> None:
    tree = ast.parse((PACKAGE / "plugin.py").read_text())
    strays = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            decorators = {ast.unparse(d) for d in node.decorator_list}
            if not (node.name.startswith("pytest_") or "pytest.fixture" in decorators):
                strays.append(node.name)
        elif isinstance(node, ast.ClassDef):
            if not any(isinstance(item, ast.FunctionDef) and item.name.startswith("pytest_") for item in node.body):
                strays.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            strays.append(ast.unparse(node).split("=")[0].strip())
    assert strays == [], f"not hooks: {strays} (machinery belongs in session.py or its concept's folder)"


#: What a reader of this repository cannot open: design notes and research kept elsewhere.
OUTSIDE = re.compile(r"DESIGN\.md|DESIGN:|FACTS\b|research/|\.\./shared|upstream-2026")


@pytest.mark.parametrize("folder", ["pytest_mnnvl", "tests", "benchmarks", "examples", "conformance"])
def test_no_text_cites_a_file_outside_this_repository(folder: str) -> None:
    root = PACKAGE.parent / folder
    hits = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in sorted(root.rglob("*"))
        if path.suffix in {".py", ".md", ".sh"} and "results" not in path.parts and path.name != "test_layout.py"
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert hits == [], "\n".join(hits)
