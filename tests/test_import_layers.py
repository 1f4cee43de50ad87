"""Imports inside imgmw run one way: no module imports another inside a function to dodge a cycle, and the
graph of module-level imports has no cycle."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "imgmw"


def _imports(path: Path) -> tuple[set[str], list[int]]:
    """Sibling modules imported at module level, and the lines of imports of siblings inside functions."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            if node in tree.body:
                top.add(node.module.split(".")[0])
            else:
                nested.append(node.lineno)
    return top, nested


def test_no_function_level_imports_of_siblings():
    offenders = {p.name: lines for p in PACKAGE.glob("*.py") if p.name != "__init__.py"
                 for lines in [_imports(p)[1]] if lines}
    assert not offenders, offenders


def test_module_imports_form_no_cycle():
    graph = {p.stem: _imports(p)[0] for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
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
