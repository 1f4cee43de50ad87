"""Every app reports a bad command line as one stderr line and exit code 2 (apps._cli.AppParser)."""
from __future__ import annotations

import importlib

import pytest

from apps._cli import run
from tests.app_checks import assert_clean_failure

APPS = ["color_transfer", "style_transfer", "barycenter", "train_generator", "texture_synth"]


@pytest.mark.parametrize("name", APPS)
@pytest.mark.parametrize("argv, fragment", [(["--iters", "0"], "--iters"), (["--bogus"], "--bogus"),
                                            (["--device", "tpu"], "--device")])
def test_bad_flags_give_one_line_and_exit_2(name, argv, fragment, tmp_path, capsys):
    app = importlib.import_module(f"apps.{name}")
    assert_clean_failure(lambda a: run(name, app.main, a), capsys, argv, tmp_path / "out", fragment)
