"""Build the walkthrough notebooks from their sources and execute them, storing the outputs.

    python notebooks/build.py                 # every notebook, full size, outputs stored in notebooks/*.ipynb
    python notebooks/build.py 03 texture      # only the notebooks whose name contains one of these words
    python notebooks/build.py --small --out /tmp/nb   # the test suite's small sizes (IMGMW_NB_SMALL=1)
    python notebooks/build.py --no-execute    # notebooks without outputs (fast; for checking the sources)

Sources live in ``notebooks/src/NN_name.py`` in the "percent" format: a line ``# %%`` starts a code cell and
``# %% [markdown]`` a markdown cell whose lines are written as comments (``# text``). ``make notebooks`` runs
this script. Each notebook runs in a fresh ``python3`` kernel (this interpreter, through jupyter_client) with
the repository on ``PYTHONPATH`` and matplotlib's inline backend, so that every figure is stored as a PNG.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCES = HERE / "src"
CELL = re.compile(r"^# %%( \[markdown\])?\s*$")
TIMEOUT = 900  # seconds per cell


def source_files() -> list[Path]:
    return sorted(SOURCES.glob("[0-9][0-9]_*.py"))


def parse_cells(text: str) -> list[nbformat.NotebookNode]:
    """The cells of a percent-format source: code cells verbatim, markdown cells with their ``# `` stripped."""
    cells: list[nbformat.NotebookNode] = []
    kind, lines = None, []

    def flush() -> None:
        body = "\n".join(lines).strip("\n")
        if kind is None or not body:
            return
        if kind == "markdown":
            body = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.split("\n"))
            cells.append(nbformat.v4.new_markdown_cell(body))
        else:
            cells.append(nbformat.v4.new_code_cell(body))

    for line in text.split("\n"):
        match = CELL.match(line)
        if match:
            flush()
            kind, lines = ("markdown" if match.group(1) else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def build_notebook(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = parse_cells(path.read_text(encoding="utf-8"))
    for i, cell in enumerate(nb.cells):  # stable ids: rebuilding an unchanged source changes nothing but outputs
        cell["id"] = f"{path.stem[:2]}-{i:02d}"
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    return nb


def kernel_env(small: bool) -> dict[str, str]:
    """The environment the kernel inherits: the checkout on PYTHONPATH, inline figures, the size switch."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("MPLBACKEND", None)  # the kernel's inline backend stores every figure as image/png
    if small:
        env["IMGMW_NB_SMALL"] = "1"
    else:
        env.pop("IMGMW_NB_SMALL", None)
    return env


def execute(nb: nbformat.NotebookNode, small: bool) -> None:
    env = kernel_env(small)
    client = NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3", record_timing="NB_TIMING" in env,
                            resources={"metadata": {"path": str(HERE)}})
    client.execute(env=env)  # the kernel process starts with this environment
    nb.metadata.pop("widgets", None)
    nb.metadata["language_info"] = {"name": "python"}  # not the exact version: keeps rebuilds diff-free


def errors(nb: nbformat.NotebookNode) -> list[str]:
    return [f"{o.get('ename')}: {o.get('evalue')}" for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="build only the notebooks whose file name contains one of these")
    p.add_argument("--small", action="store_true", help="run at the test suite's sizes (IMGMW_NB_SMALL=1)")
    p.add_argument("--no-execute", action="store_true", help="write the notebooks without running them")
    p.add_argument("--out", type=Path, default=HERE, help="where to write the .ipynb files (default notebooks/)")
    args = p.parse_args(argv)
    paths = [s for s in source_files() if not args.names or any(n in s.stem for n in args.names)]
    if not paths:
        p.error(f"no source under {SOURCES} matches {args.names}")
    if args.small and args.out.resolve() == HERE and not args.no_execute:
        p.error("--small outputs are for checking only: give --out DIR (the stored notebooks are full size)")
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for path in paths:
        nb = build_notebook(path)
        start = time.perf_counter()
        if not args.no_execute:
            try:
                execute(nb, args.small)
            except Exception as err:  # noqa: BLE001 - report every failing notebook, then fail
                failed.append(path.stem)
                print(f"{path.stem}: FAILED ({type(err).__name__}: {str(err).strip().splitlines()[-1]})",
                      file=sys.stderr)
        bad = errors(nb)
        if bad and path.stem not in failed:
            failed.append(path.stem)
        target = args.out / f"{path.stem}.ipynb"
        nbformat.write(nb, target)
        size = target.stat().st_size
        print(f"{path.stem}: {time.perf_counter() - start:6.1f} s, {size / 1024:6.0f} KB -> {target}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
