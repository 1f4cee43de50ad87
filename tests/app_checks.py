"""Assertions shared by the apps' end-to-end tests."""
from __future__ import annotations

from pathlib import Path
from typing import Callable


def assert_clean_failure(main: Callable[[list[str]], int], capsys, argv: list[str], out: Path,
                         fragment: str) -> None:
    """``main(argv)`` exits 2 with one stderr line containing ``fragment`` and leaves nothing under ``out``
    (not even the staging directory ``.<out.name>-*``)."""
    assert main(argv + ["--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}-")]
