"""Every app reports a bad command line as one stderr line and exit code 2 (apps._cli.AppParser)."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from apps._cli import run
from tests.app_checks import assert_clean_failure

APPS = ["color_transfer", "style_transfer", "barycenter", "train_generator", "texture_synth", "fit_prior"]


@pytest.mark.parametrize("name", APPS)
@pytest.mark.parametrize("argv, fragment", [(["--iters", "0"], "--iters"), (["--bogus"], "--bogus"),
                                            (["--device", "tpu"], "--device")])
def test_bad_flags_give_one_line_and_exit_2(name, argv, fragment, tmp_path, capsys):
    app = importlib.import_module(f"apps.{name}")
    assert_clean_failure(lambda a: run(name, app.main, a), capsys, argv, tmp_path / "out", fragment)


def _small_pair(tmp_path):
    from PIL import Image

    from tests.test_app_color import ROOT

    src, tgt = tmp_path / "src.png", tmp_path / "tgt.png"
    Image.open(ROOT / "data" / "coffee.jpg").resize((48, 32)).save(src)
    Image.open(ROOT / "data" / "rocket.jpg").resize((40, 28)).save(tgt)
    return src, tgt


def _stage_of(tmp_path, pid: int):
    stage = tmp_path / ".out-left"
    stage.mkdir()
    (stage / ".owner").write_text(str(pid))
    (stage / "frame_00001.png").write_text("half-written")
    return stage


def test_a_killed_runs_staging_is_removed_by_the_next_run(tmp_path, capsys):
    import subprocess
    import sys

    from apps import color_transfer

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stage = _stage_of(tmp_path, int(dead.stdout))
    src, tgt = _small_pair(tmp_path)
    out = tmp_path / "out"
    assert run("color_transfer", color_transfer.main,
               [str(src), str(tgt), "--iters", "3", "--polish-iters", "0", "--output", str(out), "--quiet"]) == 0
    assert not stage.exists()
    assert sorted(p.name for p in out.iterdir()) == [".imgmw-files", "comparison.png", "metrics.json", "result.png"]


def test_a_reused_output_folder_is_written_as_a_whole(tmp_path, capsys):
    """A rerun into the same folder removes what the previous run wrote and this one did not (frames, a result
    in the other format) and the atomic writers' temporary files a killed run left; the user's files stay."""
    from apps import color_transfer

    src, tgt = _small_pair(tmp_path)
    out = tmp_path / "out"
    base = [str(src), str(tgt), "--iters", "3", "--polish-iters", "0", "--output", str(out), "--quiet"]
    assert run("color_transfer", color_transfer.main, base + ["--save-every", "1", "--format", "jpg"]) == 0
    assert (out / "frame_00001.png").exists() and (out / "result.jpg").exists()
    (out / "notes.txt").write_text("mine")
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"half")
    assert run("color_transfer", color_transfer.main, base) == 0
    assert sorted(p.name for p in out.iterdir()) == [".imgmw-files", "comparison.png", "metrics.json", "notes.txt",
                                                     "result.png"]


def test_a_second_run_into_a_folder_being_written_is_refused(tmp_path, capsys):
    import subprocess
    import sys

    from apps import color_transfer

    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stage = _stage_of(tmp_path, writer.pid)
        src, tgt = _small_pair(tmp_path)
        out = tmp_path / "out"
        assert run("color_transfer", color_transfer.main,
                   [str(src), str(tgt), "--iters", "3", "--output", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"process {writer.pid}" in err, err
        assert not out.exists() and stage.exists()            # the live run's files are left alone
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.parametrize("name, argv", [("texture_synth", ["--lr", "1e30", "--size", "32"]),
                                        ("style_transfer", ["--lr", "2"])])
def test_an_adam_step_of_a_pixel_range_or_more_is_refused(name, argv, tmp_path, capsys):
    app = importlib.import_module(f"apps.{name}")
    assert_clean_failure(lambda a: run(name, app.main, a), capsys, argv, tmp_path / "out", "--lr")


def test_a_diverging_generator_training_exits_2_before_writing(tmp_path, capsys):
    """Adam at lr = 1e3 sends the 2-D ring generator's loss to ~1e33 within a few steps: one line naming lr,
    exit 2, no checkpoint with non-finite optimiser state left behind."""
    app = importlib.import_module("apps.train_generator")
    assert_clean_failure(lambda a: run("train_generator", app.main, a), capsys,
                         ["--lr", "1e3", "--iters", "40"], tmp_path / "out", "lr=1000")


def _disk_full(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("name, argv, writer", [
    ("color_transfer", ["--iters", "3", "--polish-iters", "0"], "PIL.Image.Image.save"),
    ("train_generator", ["--iters", "5"], "imgmw.checkpoint.os.fdopen"),
])
def test_a_full_disk_gives_one_line_and_leaves_nothing(name, argv, writer, tmp_path, capsys, monkeypatch):
    """The image writer (PIL) or the checkpoint writer fails with ENOSPC after the compute: one line, exit 2,
    no output folder and no staging left."""
    app = importlib.import_module(f"apps.{name}")
    if name == "color_transfer":
        argv = [str(p) for p in _small_pair(tmp_path)] + argv
    monkeypatch.setattr(writer, _disk_full)
    assert_clean_failure(lambda a: run(name, app.main, a), capsys, argv, tmp_path / "out", "No space left on device")


def test_an_unwritable_output_is_refused_before_the_compute(tmp_path, capsys):
    """A trial write, not os.access: a path under a read-only directory fails at once, naming the folder."""
    import os

    from apps import color_transfer

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK) and os.geteuid() == 0:  # root writes anywhere: use /proc instead
            out = Path("/proc/imgmw-out")
        else:
            out = locked / "out"
        src, tgt = _small_pair(tmp_path)
        assert run("color_transfer", color_transfer.main, [str(src), str(tgt), "--output", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "cannot write to --output" in err, err
    finally:
        locked.chmod(0o700)


def test_help_names_each_default_once_and_only_informative_ones():
    """DefaultsHelpFormatter: ``(default: X)`` for a value (0 included), not for None, a switch, or a help text
    that already names its default."""
    import argparse

    from apps._cli import DefaultsHelpFormatter

    p = argparse.ArgumentParser(prog="p", formatter_class=DefaultsHelpFormatter)
    p.add_argument("--k", type=int, default=4, help="components")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--lr", type=float, default=None, help="step (default: 0.03 for adam)")
    p.add_argument("--scales", type=int, default=None, help="levels")
    p.add_argument("--quiet", action="store_true", help="no bar")
    p.add_argument("--final-only", action="store_false", help="one correction")
    text = " ".join(p.format_help().split())
    assert "components (default: 4)" in text and "seed (default: 0)" in text
    assert text.count("default") == 3  # k, seed and lr's own
    for name in ("texture_synth", "em_operator"):
        help_text = importlib.import_module(f"apps.{name}").build_parser().format_help()
        assert "(default: None)" not in help_text and "(default: False)" not in help_text
        assert "(default: True)" not in help_text and "PosixPath" not in help_text
