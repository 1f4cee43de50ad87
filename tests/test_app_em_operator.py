"""End-to-end and command-line tests of ``python -m apps.em_operator``."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import apps.em_operator as app
import imgmw.layer_training as layer_training
from imgmw.layer_training import sets_with_starts

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--k", "2", "--dim", "2", "--n-points", "32", "--iters", "2", "--batch", "4", "--eval-sets", "8",
        "--hidden", "8", "--quiet"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_help_is_lazy_and_works():
    probe = "import sys, apps.em_operator; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=_env())
    assert out.returncode == 0 and out.stdout.strip() == "False"
    res = subprocess.run([sys.executable, "-m", "apps.em_operator", "--help"], capture_output=True, text=True,
                         cwd=ROOT, env=_env(), timeout=60)
    assert res.returncode == 0
    for flag in ("--k", "--dim", "--n-points", "--iters", "--train-steps", "--batch", "--lr", "--seed",
                 "--device", "--output", "--resume", "--quiet"):
        assert flag in res.stdout


@pytest.mark.parametrize("argv, needle", [
    (["--k", "0"], "--k"),
    (["--iters", "0"], "--iters"),
    (["--device", "tpu"], "--device"),
    (["--lr", "nan"], "--lr"),
    (["--n-points", "3", "--k", "4"], "--n-points"),
    (["--k", "two"], "--k"),
    (["--resume"], "--resume"),
    (["--seed", "99999999999999999999"], "--seed"),
    (["--lr", "-1"], "--lr"),
])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    assert app.main(argv + ["--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err and err.startswith("em_operator: error:")
    assert not out.exists()


def test_unwritable_output_exits_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert app.main(TINY + ["--output", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--output" in err
    assert blocker.read_text() == "not a directory"


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_end_to_end_tiny_run_writes_its_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert app.main(TINY + ["--train-steps", "3", "--output", str(out)]) == 0
    assert capsys.readouterr().out == ""  # --quiet
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["k"] == 2 and metrics["steps"] == 3 and metrics["resumed_from_step"] == 0
    table = metrics["table"]
    assert all(math.isfinite(table[key]) for key in ("em_T", "layer_T", "em_10T"))
    assert table["em_10T"] >= table["em_T"] - 1e-6  # EM never decreases the likelihood
    assert set(metrics["timings_s"]) == {"setup", "train", "evaluate"}
    with Image.open(out / "loss.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100
    state = _load(out / app.CHECKPOINT)
    assert state["step"] == 3 and len(state["history"]["loss"]) == 3 == len(state["history"]["em_loss"])
    assert not any(p.suffix == ".tmp" for p in out.iterdir())


def test_checkpoint_round_trip_gives_same_outputs(tmp_path):
    args = app.build_parser().parse_args(TINY + ["--train-steps", "2", "--output", str(tmp_path)])
    device = torch.device("cpu")
    trainer = app.build(args, device)
    with torch.no_grad():
        for p in trainer.layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    trainer.step_count, trainer.history, trainer.em_history = 2, [1.0, 0.5], [1.0, 0.6]
    path = tmp_path / app.CHECKPOINT
    app.save_checkpoint(path, trainer, args)
    args_other = app.build_parser().parse_args(TINY + ["--train-steps", "2", "--output", str(tmp_path)])
    other = app.build(args_other, device)
    app.load_checkpoint(path, other, args_other)
    assert other.step_count == 2 and other.history == [1.0, 0.5] and other.em_history == [1.0, 0.6]
    x, init = sets_with_starts(3, args.k, args.dim, args.n_points, torch.Generator(device=device).manual_seed(123),
                               device)
    with torch.no_grad():
        a, b = trainer.layer(x, init=init), other.layer(x, init=init)
    assert torch.equal(a[0].means, b[0].means) and torch.equal(a[2], b[2])


def test_resume_continues_an_interrupted_run_exactly(tmp_path, monkeypatch, capsys):
    steps = ["--train-steps", "6", "--save-every", "2"]
    full = tmp_path / "full"
    assert app.main(TINY + steps + ["--output", str(full)]) == 0

    part = tmp_path / "part"
    calls = {"n": 0}
    real_sets = layer_training.sets_with_starts

    def interrupting_sets(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 5 of 6: the last checkpoint is from step 4
            raise KeyboardInterrupt
        return real_sets(*args, **kwargs)

    monkeypatch.setattr(layer_training, "sets_with_starts", interrupting_sets)
    assert app.main(TINY + steps + ["--output", str(part)]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds step 4; continue with --resume" in err, err
    monkeypatch.setattr(layer_training, "sets_with_starts", real_sets)
    assert _load(part / app.CHECKPOINT)["step"] == 4 and not (part / "metrics.json").exists()

    assert app.main(TINY + steps + ["--output", str(part), "--resume"]) == 0
    a, b = _load(full / app.CHECKPOINT), _load(part / app.CHECKPOINT)
    assert a["step"] == b["step"] == 6
    assert a["history"] == b["history"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    assert json.loads((part / "metrics.json").read_text())["resumed_from_step"] == 4

    # resuming with another architecture is a usage error, and leaves the checkpoint alone
    assert app.main(TINY + steps + ["--output", str(part), "--resume", "--hidden", "16"]) == 2
    assert _load(part / app.CHECKPOINT)["step"] == 6


@pytest.mark.parametrize("content", [b"not a checkpoint\n", None, "foreign"])
def test_resume_from_a_bad_checkpoint_is_one_line(tmp_path, capsys, content):
    """A text file, a truncated checkpoint and another program's torch file: exit 2, one line naming --resume."""
    out = tmp_path / "out"
    if content is None:  # truncated: the first half of a real checkpoint
        assert app.main(TINY + ["--train-steps", "2", "--output", str(out)]) == 0
        data = (out / app.CHECKPOINT).read_bytes()
        (out / app.CHECKPOINT).write_bytes(data[: len(data) // 2])
    else:
        out.mkdir()
        if content == "foreign":
            torch.save({"weights": torch.zeros(3)}, out / app.CHECKPOINT)
        else:
            (out / app.CHECKPOINT).write_bytes(content)
    capsys.readouterr()
    assert app.main(TINY + ["--train-steps", "4", "--output", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and "checkpoint" in err, err


def test_a_diverging_training_is_reported_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert app.main(TINY + ["--train-steps", "30", "--lr", "1e30", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "diverged" in err and "lr=1e+30" in err, err
    assert not out.exists()
