"""Imports inside imgmw run one way: no module imports another inside a function to dodge a cycle, and the
graph of module-level imports (subpackages included) has no cycle."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "imgmw"
FILES = sorted(PACKAGE.rglob("*.py"))


def _module(path: Path) -> str:
    """Dotted name below imgmw: ``bures``, ``ot`` (its ``__init__``), ``ot.mixture``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    """The imgmw module a relative ``from ... import`` names, as a dotted name below imgmw."""
    package = list(path.relative_to(PACKAGE).parts[:-1])
    base = package[:len(package) - (node.level - 1)]
    target = ".".join(base + ([node.module] if node.module else []))
    known = {_module(p) for p in FILES}
    while target and target not in known:  # `from .ot.mixture import f` or a name imported from a package
        target = target.rpartition(".")[0]
    return target


def _imports(path: Path) -> tuple[set[str], list[int]]:
    """imgmw modules imported at module level, and the lines of relative imports inside functions."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            if node in tree.body:
                top.add(_resolve(path, node))
            else:
                nested.append(node.lineno)
    return top, nested


def test_subpackages_are_scanned():
    assert "ot.mixture" in {_module(p) for p in FILES}


def test_no_function_level_imports_of_siblings():
    offenders = {_module(p): lines for p in FILES if p.name != "__init__.py"
                 for lines in [_imports(p)[1]] if lines}
    assert not offenders, offenders


def test_module_imports_form_no_cycle():
    graph = {_module(p): _imports(p)[0] - {_module(p)} for p in FILES if _module(p)}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, " -> ".join(path + [node, nxt])
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
