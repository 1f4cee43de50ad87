"""Atomic checkpoint files: the file at ``path`` is either the previous one or the complete new one."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_atomic"]


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
