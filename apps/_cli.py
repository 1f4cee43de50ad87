"""Shared command-line plumbing for the apps: common flags, device choice, staged (atomic) outputs and
the one-line error convention (message on stderr, exit code 2, nothing written).

This module imports nothing heavy at import time, so ``python -m apps.NAME --help`` stays fast.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator, Sequence

__all__ = ["AppError", "Interrupted", "AppParser", "DefaultsHelpFormatter", "seed", "check_output", "add_common_args",
           "check_input_file", "resolve_device", "staged_output", "write_json", "settings", "read_resume_checkpoint",
           "run", "positive_int", "non_negative_int", "positive_float", "check_pixel_adam_lr", "process_group_for"]


class AppError(Exception):
    """A user-facing problem (bad flag value, unreadable input, unwritable output): exit code 2."""


class Interrupted(AppError):
    """Ctrl-C during a run that had already saved something (a checkpoint): the message says what; exit 130."""


class AppParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as an AppError: one line on stderr and exit code 2 through
    :func:`run` (argparse's own error prints the whole usage first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise AppError(message)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to a flag's help only where it says something: not when the help already names
    its default, not for an unset option (default ``None``) nor for a switch (``store_true``/``store_false``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if "default" in text or switch or action.default is None or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def check_pixel_adam_lr(lr: float | None) -> None:
    """Adam moves every pixel by about ``lr`` per step whatever the gradient's size, and pixels live in
    [0, 1]: ``lr >= 1`` throws them to the clamp at every step (the result is saturated noise)."""
    if lr is not None and lr >= 1:
        raise AppError(f"--lr {lr:g} is too large for Adam on pixels in [0, 1] (each step moves a pixel by about "
                       "lr); use a value below 1")


def seed(text: str) -> int:
    """argparse type: an integer seed in [0, 2⁶³ − 1] (what ``torch.Generator.manual_seed`` accepts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2^63 - 1], got {text}")
    return value


def add_common_args(parser: argparse.ArgumentParser, name: str, *, iters: int | None,
                    iters_help: str | None = None) -> None:
    """Flags every app shares: ``--device --seed --iters --output --quiet --save-every`` (``iters=None``: the
    app fills the default in, described by ``iters_help``)."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to compute (auto: cuda if available, else cpu)")
    parser.add_argument("--seed", type=seed, default=0, help="random seed (same seed, same output on one device)")
    parser.add_argument("--iters", type=positive_int, default=iters,
                        help=iters_help or f"optimisation steps (default {iters})")
    parser.add_argument("--output", type=Path, default=Path("outputs") / name,
                        help=f"output directory (default outputs/{name})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--save-every", type=non_negative_int, default=0, metavar="N",
                        help="also save an intermediate frame every N steps (0: never)")


def check_input_file(path: Path, what: str) -> None:
    """An ``AppError`` naming ``what`` (e.g. "source image") unless ``path`` is an existing file."""
    if not path.exists():
        raise AppError(f"{what} {path} does not exist")
    if path.is_dir():
        raise AppError(f"{what} {path} is a directory, not a file")


def resolve_device(name: str):
    """``torch.device`` for ``auto|cpu|cuda``; a clear AppError when CUDA is asked for but absent."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise AppError("--device cuda was requested but no CUDA device is available; use --device cpu")
    return torch.device(name)


@contextlib.contextmanager
def process_group_for(device_name: str):
    """``with process_group_for(args.device) as (group, device):`` for an app that may run under ``torchrun``:
    with ``WORLD_SIZE > 1`` in the environment the default group is initialised (gloo on CPU, NCCL on CUDA,
    each rank on its ``LOCAL_RANK`` GPU) and destroyed on the way out; otherwise ``(None,
    resolve_device(device_name))``."""
    import torch
    import torch.distributed as dist

    device = resolve_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None, device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.group.WORLD, device
        dist.barrier()  # every rank done (rank 0 writes last) before the group goes away under any of them
    finally:
        dist.destroy_process_group()


def check_output(final: Path) -> None:
    """An ``AppError`` unless files can be created where ``final`` is or will be: a real trial write (and
    removal) of a temporary file in its nearest existing ancestor, so read-only mounts, ``/sys``-like
    trees and full disks are reported before any compute (``os.access`` accepts some of them)."""
    final = Path(final)
    parent = final
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise AppError(f"--output {final} is not a directory (it is under the file {parent})")
    if final.exists() and not final.is_dir():
        raise AppError(f"--output {final} exists and is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".imgmw-write-test-"):
            pass
    except OSError as err:
        raise AppError(f"cannot write to --output {final}: {err.strerror or err}") from None


STAGE_OWNER = ".owner"  # file in a staging directory holding the writing process's id


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _claim(final: Path, existing: Path) -> None:
    """Remove staging directories of ``final`` left by killed runs; refuse while another run writes there."""
    for stage in existing.glob(f".{final.name}-*"):
        if not stage.is_dir():
            continue
        try:
            pid = int((stage / STAGE_OWNER).read_text())
        except (OSError, ValueError):
            pid = None
        if pid is not None and pid != os.getpid() and _alive(pid):
            raise AppError(f"another run (process {pid}) is writing to {final}; wait for it or choose another --output")
        shutil.rmtree(stage, ignore_errors=True)


MANIFEST = ".imgmw-files"  # in an output folder: the files the last run wrote there, one relative path per line


def _remove_stale_temporaries(final: Path) -> None:
    """Temporary files of the atomic writers (``.NAME.*.tmp``, ``.NAME.tmp``) left in ``final`` by a killed run
    (called once the folder is claimed, so no live run can own them)."""
    if final.is_dir():
        for tmp in final.glob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


def _previous_files(final: Path) -> set[str]:
    try:
        return {line for line in (final / MANIFEST).read_text().splitlines() if line}
    except OSError:
        return set()


@contextlib.contextmanager
def staged_output(final: Path) -> Iterator[Path]:
    """Write into a temporary directory next to ``final``; move the files into ``final`` only on success.

    On any exception the temporary directory is removed, so a failed run leaves no partial output. The
    staging directory records the writing process: a later run into the same ``final`` removes the staging
    and temporary files left by a killed run, and refuses to start while a live run is still writing there.
    ``final`` is written as a whole: files that the previous run wrote there (listed in its ``MANIFEST``) and
    this one did not (old frames, a ``result.jpg`` beside a new ``result.png``) are removed; files the user
    put there are left alone.
    """
    final = Path(final)
    check_output(final)
    parent = final.parent if final.parent != Path("") else Path(".")
    existing = parent
    while not existing.exists():
        existing = existing.parent
    _claim(final, existing)
    _remove_stale_temporaries(final)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=existing))
        (stage / STAGE_OWNER).write_text(str(os.getpid()))
    except OSError as err:
        raise AppError(f"cannot write to --output {final}: {err.strerror or err}") from None
    try:
        yield stage
        final.mkdir(parents=True, exist_ok=True)
        written = []
        for path in sorted(stage.rglob("*")):
            target = final / path.relative_to(stage)
            if path.name == STAGE_OWNER and path.parent == stage:
                continue
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                os.replace(path, target)
                written.append(path.relative_to(stage).as_posix())
        root = final.resolve()
        for stale in _previous_files(final) - set(written):
            path = (final / stale).resolve()
            if path.is_relative_to(root) and path.is_file():
                path.unlink()
        manifest = final / f".{MANIFEST}.tmp"
        manifest.write_text("".join(f"{name}\n" for name in written))
        os.replace(manifest, final / MANIFEST)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _strict(value):
    """``value`` with every non-finite float (NaN, ±inf) replaced by ``None``, recursively: strict JSON."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(obj: dict, path: Path) -> None:
    """Write ``obj`` as indented, strict JSON (non-finite numbers become ``null``) atomically (temp file +
    rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_strict(json.loads(json.dumps(obj, default=float))), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def settings(args: argparse.Namespace) -> dict:
    """The parsed flags as JSON-able values (paths, also in lists, as strings): what metrics.json and checkpoints
    record."""
    def plain(value: Any) -> Any:
        return [plain(v) for v in value] if isinstance(value, list) else str(value) if isinstance(value, Path) \
            else value
    return {key: plain(value) for key, value in vars(args).items()}


def read_resume_checkpoint(path: Path, args: argparse.Namespace, keys: Sequence[str], must_match: Sequence[str],
                           map_location=None) -> dict:
    """The checkpoint dict at ``path`` for ``--resume``: readable (:func:`imgmw.checkpoint.load_file`), holding
    ``keys`` and a ``"settings"`` dict whose flags in ``must_match`` equal this run's; else ``AppError`` naming
    the file and the differing flags."""
    from imgmw.checkpoint import load_file

    try:
        state = load_file(path, map_location)
    except ValueError as err:
        raise AppError(f"--resume: {err}") from None
    if not isinstance(state, dict) or not {*keys, "settings"} <= set(state):
        raise AppError(f"--resume: {path} is not a checkpoint of this app (expected the keys {', '.join(keys)})")
    saved, now = state["settings"], settings(args)
    diff = [f"--{key.replace('_', '-')}" for key in must_match if saved.get(key) != now[key]]
    if diff:
        raise AppError(f"--resume: checkpoint {path} was trained with different {', '.join(diff)}")
    return state


def run(prog: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; turn user-facing errors into one line on stderr and exit code 2."""
    try:
        return main(argv)
    except Interrupted as err:
        print(f"{prog}: interrupted; {err}", file=sys.stderr)
        return 130
    except AppError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # imgmw raises ValueError (and subclasses) for bad input
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except ArithmeticError as err:  # imgmw.flow.FlowDivergence: a step size too large for the problem
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a write that failed after the checks (disk full, a file removed under us)
        where = f" ({err.filename})" if err.filename else ""
        print(f"{prog}: error: could not write or read a file{where}: {err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing written", file=sys.stderr)
        return 130
