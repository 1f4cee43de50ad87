"""The walkthrough notebooks under notebooks/: stored executed (with their figures) and in step with their sources in
notebooks/src/, written with imgmw's public names only, linked from the README, and executed at small sizes
(IMGMW_NB_SMALL=1; a failing cell fails the test)."""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
IMAGES = ("image/png", "image/jpeg")


def _build_module():
    spec = importlib.util.spec_from_file_location("notebooks_build", NB_DIR / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _build_module()


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def _draws(source: str) -> bool:
    """Whether a cell makes a figure: a call of plt.subplots / plt.figure / plt.show or of a notebook's display
    helper (show, gallery) outside function definitions."""
    for statement in ast.parse(source).body:
        if isinstance(statement, (ast.FunctionDef, ast.ClassDef)):
            continue
        for node in ast.walk(statement):
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in ("show", "gallery"):
                    return True
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "plt" \
                        and f.attr in ("subplots", "figure", "show"):
                    return True
    return False


def _private_names(source: str) -> list[str]:
    """Private names (a leading underscore) a cell takes from imgmw or apps, or reads as attributes."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("imgmw", "apps"):
            parts = (node.module or "").split(".") + [a.name for a in node.names]
            found += [p for p in parts if p.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [p for a in node.names for p in a.name.split(".") if p.startswith("_")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.endswith("__"):
            found.append(node.attr)
    found += [m.group(0) for m in re.finditer(r"\b(?:imgmw|apps)(?:\.\w+)*\._(?!_)\w+", source)]
    return found


def test_there_are_notebooks():
    assert NOTEBOOKS
    assert [p.stem for p in NOTEBOOKS] == [s.stem for s in BUILD.source_files()], \
        "every notebook has a source in notebooks/src/ and every source a stored notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stored_notebook_matches_its_source(path):
    stored = nbformat.read(path, as_version=4)
    built = BUILD.build_notebook(NB_DIR / "src" / f"{path.stem}.py")
    assert [(c.cell_type, c.source) for c in stored.cells] == [(c.cell_type, c.source) for c in built.cells], \
        f"{path.name} is stale: run `make notebooks` (or python notebooks/build.py {path.stem[:2]})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stored_notebook_is_executed_with_its_figures(path):
    nb = nbformat.read(path, as_version=4)
    cells = _code_cells(nb)
    outputs = [o for c in cells for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} stores no PNG figure"
    assert not [o for o in outputs if o.output_type == "error"], f"{path.name} stores an error"
    assert all(c.execution_count is not None for c in cells), f"{path.name} has cells that were not executed"
    for cell in cells:
        if _draws(cell.source):
            assert any(m in o.get("data", {}) for o in cell.get("outputs", []) for m in IMAGES), \
                f"{path.name}: a cell that draws stores no image:\n{cell.source[:200]}"
    assert 'SMALL = os.environ.get("IMGMW_NB_SMALL") == "1"' in cells[0].source, \
        f"{path.name}: the first code cell reads IMGMW_NB_SMALL"
    first, last = nb.cells[0], nb.cells[-1]
    assert first.cell_type == "markdown" and "Run time" in first.source, f"{path.name}: intro with the run time"
    assert last.cell_type == "markdown" and "What next" in last.source and "python -m apps." in last.source, \
        f"{path.name}: ends with a 'What next' pointer to an app"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_uses_public_names_only(path):
    nb = nbformat.read(path, as_version=4)
    for cell in _code_cells(nb):
        assert not _private_names(cell.source), f"{path.name} uses private names: {_private_names(cell.source)}"


def test_checks_see_what_they_should():
    assert _draws("fig, ax = plt.subplots()\nshow(fig)") and _draws("gallery([a], ['a'], 'x')")
    assert not _draws("def gallery(images):\n    fig, ax = plt.subplots()\n    show(fig)\n\nx = 1")
    assert _private_names("from imgmw.image import load_image, _resize")
    assert _private_names("from imgmw._cli import run")
    assert _private_names("x = imgmw.image._resize(img, (2, 2))")
    assert _private_names("g._cache")
    assert not _private_names("import imgmw\nfrom imgmw.image import resize_max\nprint(imgmw.__version__)")


def test_readme_links_every_notebook():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        lines = [line for line in readme.splitlines() if f"](notebooks/{path.name})" in line]
        assert len(lines) == 1, f"README.md needs one line linking notebooks/{path.name}"
    assert "docs/architecture.md" in readme


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in _code_cells(nb):
        cell.outputs = []
    env = BUILD.kernel_env(small=True)  # this interpreter's kernel, the checkout on PYTHONPATH, IMGMW_NB_SMALL=1
    env["MPLBACKEND"] = "Agg"
    # a hang guard, not a speed check (the run times are reported by pytest --durations and in the README)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NB_DIR)}})
    client.execute(env=env)
    errors = [o for c in _code_cells(nb) for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
