"""kill -9 in the middle of a training app, then ``--resume``: the run continues from the last checkpoint and
leaves no staging folder or temporary file behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
APPS = {
    "train_generator": (["--iters", "4000", "--save-every", "10", "--k", "4", "--batch", "64"], "step"),
    "em_operator": (["--k", "2", "--dim", "2", "--n-points", "32", "--iters", "2", "--batch", "4", "--eval-sets", "8",
                     "--hidden", "8", "--train-steps", "4000", "--save-every", "10"], "step"),
}


def _saved_step(path: Path, key: str) -> int:
    state = torch.load(path, weights_only=False)
    return int(state["trainer"][key] if "trainer" in state else state[key])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(APPS))
def test_kill_9_then_resume(name, tmp_path):
    argv, key = APPS[name]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", f"apps.{name}", *argv, "--output", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = out / "checkpoint.pt"
    try:
        deadline = time.monotonic() + 120
        while not (ckpt.exists() and _saved_step(ckpt, key) >= 20):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = _saved_step(ckpt, key)
    assert killed_at >= 20 and killed_at % 10 == 0
    # what the killed run left: its staging folder beside out (and possibly a temporary checkpoint)
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]
    total = killed_at + 10
    resume = [a if a not in ("4000",) else str(total) for a in argv]
    done = subprocess.run([sys.executable, "-m", f"apps.{name}", *resume, "--output", str(out), "--quiet",
                           "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == killed_at
    assert _saved_step(ckpt, key) == total
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]
    assert not list(out.glob(".*.tmp"))
