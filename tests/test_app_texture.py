"""End-to-end tests of ``python -m apps.texture_synth`` at tiny sizes (48×48 outputs from 64×64 crops).

Checked: the files and the metrics written, the quality gain over the Gaussian-random-field start
(patch sliced-W2 of the result at least 2× below that of the noise, on a structured exemplar), sizes,
tileability (seam energy), determinism, and that bad input exits with code 2, one line on stderr and no
output directory.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apps._cli import run
from apps.texture_synth import main
from imgmw.image import load_image
from imgmw.metrics import patch_sliced_w2, seam_energy

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def exemplar(tmp_path_factory) -> Path:
    """A 64×64 crop of the brick wall: strongly structured (sharp mortar lines), far from Gaussian."""
    path = tmp_path_factory.mktemp("ex") / "brick64.png"
    Image.open(ROOT / "data" / "brick.png").crop((0, 0, 64, 64)).save(path)
    return path


def _run(exemplar: Path, out: Path, *flags: str) -> int:
    return main([str(exemplar), "--output", str(out), "--quiet", *flags])


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.slow
def test_synthesis_beats_the_noise_start(exemplar, tmp_path):
    out = tmp_path / "run"
    assert _run(exemplar, out, "--size", "48", "--iters", "150") == 0
    for name in ("texture.png", "comparison.png", "loss.png", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["size"] == [48, 48] and metrics["settings"]["scales"] == 2
    assert len(metrics["loss"]["final_per_scale"]) == 2
    assert metrics["loss"]["final_total"] < 0.5 * sum(metrics["loss"]["first_per_scale"])
    # recompute the quality metric independently from the files written
    ex, result = load_image(exemplar), load_image(out / "texture.png")
    assert result.shape == (3, 48, 48)
    psw_result = patch_sliced_w2(result, ex)
    assert psw_result == pytest.approx(metrics["patch_sliced_w2"][0]["result"], rel=0.05)  # PNG rounding only
    assert psw_result < metrics["patch_sliced_w2"][0]["init"] / 2
    structure = metrics["structure_distance"][0]
    assert structure["result"] < structure["init"]          # closer to real exemplar patches than the noise
    assert 0 <= metrics["near_copy_fraction"][0]["result"] < 0.5


def test_non_square_size_is_honoured(exemplar, tmp_path):
    out = tmp_path / "wide"
    assert _run(exemplar, out, "--size", "56x40", "--iters", "2", "--finish-iters", "2", "--save-every", "1") == 0
    assert Image.open(out / "texture.png").size == (56, 40)        # PIL sizes are (W, H)
    frames = sorted(p.name for p in (out / "frames").iterdir())     # the MW2 steps, then the finish's
    assert frames == ["step_00001.png", "step_00002.png", "step_00003.png", "step_00004.png"]
    assert json.loads((out / "metrics.json").read_text())["settings"]["size"] == [40, 56]


@pytest.mark.slow
def test_tileable_output_has_no_seam(exemplar, tmp_path):
    out = tmp_path / "tile"
    assert _run(exemplar, out, "--size", "48", "--iters", "60", "--finish-iters", "20", "--tileable") == 0
    result = load_image(out / "texture.png").double()
    assert seam_energy(result)["ratio"] < 2.5               # a plain crop of the init scores 4-5 here
    # the wrap-around edge is not an outlier among the image's column (row) edges
    for dim in (2, 1):
        edges = (torch.roll(result, -1, dims=dim) - result).square().mean(dim=(0, 3 - dim))   # [W] or [H]
        assert edges[-1] <= edges[:-1].max()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seam_energy"]["init"]["ratio"] < 1.5              # the periodic start already tiles
    comparison = Image.open(out / "comparison.png")
    assert comparison.height == 2 * 48 + 8                             # the 2×2 tiling sets the height


def test_deterministic_for_a_fixed_seed(exemplar, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, seed in zip(runs, ("3", "3", "4")):
        assert _run(exemplar, out, "--size", "32", "--iters", "3", "--finish-iters", "5", "--seed", seed,
                    "--device", "cpu") == 0
    a, b, c = (_pixels(out / "texture.png") for out in runs)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_no_despeckle_keeps_the_finished_image(exemplar, tmp_path):
    runs = {flag: tmp_path / name for flag, name in ((None, "default"), ("--no-despeckle", "kept"))}
    for flag, out in runs.items():
        assert _run(exemplar, out, "--size", "40", "--iters", "3", "--finish-iters", "8",
                    "--finish-colour-weight", "400", *([flag] if flag else [])) == 0
    metrics = {flag: json.loads((out / "metrics.json").read_text()) for flag, out in runs.items()}
    kept = metrics["--no-despeckle"]
    assert kept["speckles_replaced"] == 0 and not kept["settings"]["despeckle"]
    assert metrics[None]["settings"]["despeckle"] and metrics[None]["speckles_replaced"] > 0
    changed = (_pixels(runs[None] / "texture.png") != _pixels(runs["--no-despeckle"] / "texture.png")).any(-1).sum()
    assert changed <= metrics[None]["speckles_replaced"]


def test_lbfgs_runs_and_lowers_the_loss(exemplar, tmp_path):
    out = tmp_path / "lbfgs"
    assert _run(exemplar, out, "--size", "32", "--iters", "5", "--optimizer", "lbfgs", "--finish-iters", "0") == 0
    loss = json.loads((out / "metrics.json").read_text())["loss"]
    assert sum(loss["final_per_scale"]) < sum(loss["first_per_scale"])


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.png").write_text("this is not an image\n")
    Image.new("RGB", (3, 3), (10, 20, 30)).save(d / "tiny.png")
    return {"not_image": d / "notes.png", "tiny": d / "tiny.png", "missing": d / "missing.png"}


@pytest.mark.parametrize("case, flags, match", [
    ("not_image", [], "not an image"),
    ("missing", [], "does not exist"),
    ("tiny", [], "too small"),
    (None, ["--size", "0"], "size"),
    (None, ["--size", "100000"], "size"),
    (None, ["--size", "64x"], "size"),
    (None, ["--optimizer", "sgd"], "optimizer"),
    (None, ["--patch", "0"], "patch"),
    (None, ["--iters", "-3"], "iters"),
    (None, ["--finish-colour-weight", "-1"], "finish-colour-weight"),
    (None, ["--finish-colour-weight", "nan"], "finish-colour-weight"),
    (None, ["--scales", "6"], "too small"),
])
def test_bad_input_exits_2_and_writes_nothing(case, flags, match, bad_files, exemplar, tmp_path, capsys):
    source = bad_files[case] if case else exemplar
    out = tmp_path / "out"
    code = run("texture_synth", main, [str(source), "--output", str(out), "--quiet", "--iters", "2", *flags])
    assert code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0].lower(), err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []                              # no staging directory left behind


def test_bad_flag_in_a_subprocess(exemplar, tmp_path):
    """The ``python -m`` entry point maps errors to exit code 2 and one line too (a flag error: no torch)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "apps.texture_synth", str(exemplar), "--optimizer", "sgd",
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "optimizer" in proc.stderr
    assert not out.exists()


def test_subprocess_run_and_fast_help(exemplar, tmp_path):
    start = time.perf_counter()
    help_proc = subprocess.run([sys.executable, "-m", "apps.texture_synth", "--help"], cwd=ROOT,
                               capture_output=True, text=True)
    help_seconds = time.perf_counter() - start
    assert help_proc.returncode == 0 and "--tileable" in help_proc.stdout
    assert help_seconds < 2.0
    probe = subprocess.run([sys.executable, "-c", "import apps.texture_synth, sys; "
                            "print('torch' in sys.modules)"], cwd=ROOT, capture_output=True, text=True)
    assert probe.stdout.strip() == "False"                             # --help does not import torch
    out = tmp_path / "sub"
    proc = subprocess.run([sys.executable, "-m", "apps.texture_synth", str(exemplar), "--size", "32",
                           "--iters", "2", "--finish-iters", "2", "--quiet", "--output", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and (out / "texture.png").is_file()
    assert torch.equal(torch.tensor(load_image(out / "texture.png").shape), torch.tensor([3, 32, 32]))


@pytest.mark.slow
def test_mixing_two_exemplars(tmp_path):
    """--mix 0.5 0.5 between stripes and veins: every exemplar is scored, and the result sits between them
    (closer in patch statistics to each exemplar than the other exemplar is)."""
    from imgmw.metrics import patch_sliced_w2

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.open(ROOT / "data" / "stripes.png").crop((0, 0, 64, 64)).save(a)
    Image.open(ROOT / "data" / "veins.png").crop((0, 0, 64, 64)).save(b)
    out = tmp_path / "mix"
    assert main([str(a), str(b), "--mix", "0.5", "0.5", "--size", "48", "--iters", "120", "--output", str(out),
                 "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["mix"] == [0.5, 0.5] and len(metrics["patch_sliced_w2"]) == 2
    ea, eb = load_image(a), load_image(b)
    across = patch_sliced_w2(ea, eb)
    assert all(m["result"] < across for m in metrics["patch_sliced_w2"])
