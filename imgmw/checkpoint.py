"""Checkpoint files: written atomically (the file at ``path`` is either the previous one or the complete new
one) and read with one clear error for anything that is not a readable torch file."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_atomic", "load_file"]


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` into a temporary file beside ``path``, then ``os.replace`` it into place.

    On any failure (disk full, interrupt) the temporary file is removed and ``path`` is untouched. The object
    is serialised in memory first, so a full disk surfaces as ``OSError`` (ENOSPC) from the file write rather
    than as the zip writer's ``RuntimeError``.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getbuffer())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_file(path: str | os.PathLike, map_location: torch.device | str | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` (tensors and plain containers only). A file that cannot be read
    as such, whatever the reason (truncated, another format, a pickle of other objects), raises ``ValueError``
    naming it with the first line of the cause, so that callers report one line instead of a traceback."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch.load fails with many types (struct.error, UnpicklingError, RuntimeError, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {first})") from None
