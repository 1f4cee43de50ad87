"""MW2 barycentres by a flow of points (imgmw.barycentre) and the ``python -m apps.barycenter`` app.

References: the fixed-point GMM barycentre :func:`imgmw.gmm_barycentre` (a different algorithm for the same
functional), POT's ``ot.gmm.gmm_ot_loss`` for the objective, Monte-Carlo moments for the initial noise.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apps import barycenter
from apps._cli import run
from tests.app_checks import assert_clean_failure
from imgmw import GMM, WarmStartEM, gmm_barycentre, mw2
from imgmw.barycentre import (barycentre_flow, barycentre_objective, barycentre_report, barycentre_weights,
                              colour_targets, demo_targets, palette_image, recolour_to_gmm, stack_targets)
from imgmw.metrics import color_sliced_w2

ROOT = Path(__file__).resolve().parent.parent


def _flow(seed: int, iters: int = 60, n: int = 200, targets=None, **kw):
    targets = demo_targets() if targets is None else targets
    g = torch.Generator().manual_seed(seed)
    em = WarmStartEM(2, fixed_weights=True, reg_covar=4e-5, n_init_iter=30, generator=g)
    x, history = barycentre_flow(targets, None, n, n_iter=iters, lr=0.1, generator=g, em=em, **kw)
    return x, history, em.state


# --------------------------------------------------------------------------------------------- library
def test_objective_matches_pot():
    """barycentre_objective = Σ λ_i MW2² with MW2² from POT's gmm_ot_loss (independent implementation)."""
    from ot.gmm import gmm_ot_loss

    targets = demo_targets()
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fit = GMM(torch.tensor([0.5, 0.5], dtype=torch.float64), x[:2], torch.eye(2, dtype=torch.float64).expand(2, 2, 2))
    lam = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    total, per = barycentre_objective(fit, stack_targets(targets), lam)
    ref = [gmm_ot_loss(fit.means.numpy(), t.means.numpy(), fit.covariances.numpy(), t.covariances.numpy(),
                       fit.weights.numpy(), t.weights.numpy()) for t in targets]
    np.testing.assert_allclose(per.numpy(), ref, rtol=1e-10)
    assert float(total) == pytest.approx(float(np.dot(lam.numpy(), ref)), rel=1e-12)


def test_flow_lands_on_fixed_point_barycentres():
    """The EM fit of the flow's points is an MW2 barycentre: it coincides (MW2² < 1e-8; measured <= 2e-10 in
    float64) with one of the fixed-point barycentres of gmm_barycentre (started from each target: the functional
    has 3 local minima here), gmm_barycentre started at it does not move, the flow never ends above where it
    started, and over four seeds it finds the best of the fixed points."""
    targets = demo_targets()
    stacked = stack_targets(targets)
    lam = barycentre_weights(None, 3, stacked.means)
    fixed = [gmm_barycentre(targets, init=t) for t in targets]
    fixed_values = [float(barycentre_objective(f, stacked, lam)[0]) for f in fixed]
    finals = []
    for seed in range(4):
        _, history, fit = _flow(seed)
        assert history[-1] < history[0] - 0.5
        assert history[-1] <= min(history) + 1e-9
        assert min(float(mw2(fit, f)) for f in fixed) < 1e-8
        assert float(mw2(gmm_barycentre(targets, init=fit), fit)) < 1e-8
        finals.append(history[-1])
    assert min(finals) == pytest.approx(min(fixed_values), rel=1e-9)


def test_report_scores_the_flow_and_the_fixed_point():
    """barycentre_report's numbers are the objective of the fit and of gmm_barycentre's fixed point, and the
    fresh refit of converged points agrees with the warm-started fit (the loss still describes its points)."""
    targets = demo_targets()
    x, history, fit = _flow(0, iters=150)
    report = barycentre_report(x, fit, targets, n_components=2, reg_covar=4e-5,
                               generator=torch.Generator().manual_seed(0))
    stacked = stack_targets(targets)
    lam = barycentre_weights(None, 3, stacked.means)
    assert report["final_objective"] == pytest.approx(float(barycentre_objective(fit, stacked, lam)[0]), rel=1e-12)
    assert report["final_objective"] == pytest.approx(history[-1], rel=1e-3)
    assert report["per_target_mw2"] == pytest.approx([float(mw2(fit, t)) for t in targets], rel=1e-12)
    fixed = gmm_barycentre(targets, lam)
    assert report["fixed_point_objective"] == pytest.approx(float(barycentre_objective(fixed, stacked, lam)[0]))
    assert report["mw2_flow_fit_to_fixed_point"] == pytest.approx(float(mw2(fit, fixed)), abs=1e-12)
    assert report["refit_mw2"] == pytest.approx(report["final_objective"], rel=0.02)


def test_flow_float32_and_weights():
    """Non-uniform weights, float32: the flow's fit is still a fixed point of gmm_barycentre (MW2² < 1e-4)."""
    targets = [t.to(torch.float32) for t in demo_targets()]
    weights = [0.6, 0.3, 0.1]
    g = torch.Generator().manual_seed(0)
    em = WarmStartEM(2, fixed_weights=True, reg_covar=4e-5, n_init_iter=30, generator=g)
    _, history = barycentre_flow(targets, weights, 200, n_iter=60, lr=0.1, generator=g, em=em)
    assert history[-1] < history[0]
    assert float(mw2(gmm_barycentre(targets, weights, init=em.state), em.state)) < 1e-4


def test_batched_flow_equals_separate_flows():
    """Targets with a batch dim [2] give the same points as two separate flows from the same start."""
    a, b = demo_targets(), [GMM(t.weights, t.means * 0.5 + 1.0, t.covariances * 2.0) for t in demo_targets()]
    init = torch.randn(2, 60, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    start = [GMM(torch.full((2,), 0.5, dtype=torch.float64), init[i, :2].clone(),
                 torch.eye(2, dtype=torch.float64).expand(2, 2, 2)) for i in range(2)]
    singles = [barycentre_flow(ts, None, init=init[i], n_iter=10,
                               em=WarmStartEM(2, init=start[i], fixed_weights=True, reg_covar=1e-4))[0]
               for i, ts in enumerate((a, b))]
    batched_targets = [GMM.stack([ta, tb]) for ta, tb in zip(a, b)]
    batched, _ = barycentre_flow(batched_targets, None, init=init, n_iter=10,
                                 em=WarmStartEM(2, init=GMM.stack(start), fixed_weights=True, reg_covar=1e-4))
    torch.testing.assert_close(batched, torch.stack(singles), rtol=1e-10, atol=1e-10)


def test_moment_matched_noise():
    """init="moments" draws points with the mean and covariance of Σ λ_i ν_i (Monte-Carlo reference)."""
    targets = demo_targets()
    weights = [0.5, 0.25, 0.25]
    x, _ = barycentre_flow(targets, weights, 100_000, n_iter=0, init="moments",
                           generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    counts = torch.multinomial(torch.tensor(weights), 100_000, replacement=True, generator=g).bincount(minlength=3)
    ref = torch.cat([t.sample(int(c), g)[0] for t, c in zip(targets, counts)])
    torch.testing.assert_close(x.mean(0), ref.mean(0), atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), torch.cov(ref.T), atol=0.1, rtol=0.02)
    z, _ = barycentre_flow(targets, weights, 100_000, n_iter=0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.cov(z.T), torch.eye(2, dtype=z.dtype), atol=0.02, rtol=0)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"weights": [0.5, 0.5]}, "weights must be 3"),
    ({"weights": [0.7, 0.7, -0.4]}, "weights must be 3"),
    ({"weights": [0.2, 0.2, 0.2]}, "sum to 1"),
    ({"n_points": 1}, "N >= 2"),
    ({"init": "uniform"}, "init must be"),
    ({"lr": float("nan")}, "lr"),
])
def test_flow_rejects_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        barycentre_flow(demo_targets(), **{"n_iter": 1, **kwargs})


def test_targets_must_agree():
    t = demo_targets()
    three = GMM(torch.full((3,), 1 / 3, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64),
                torch.eye(2, dtype=torch.float64).expand(3, 2, 2))
    with pytest.raises(ValueError, match="same K"):
        stack_targets([t[0], three])
    with pytest.raises(ValueError, match="non-empty list"):
        stack_targets(t[0])
    with pytest.raises(ValueError, match="dtype"):
        stack_targets([t[0], t[1].to(torch.float32)])


def test_palette_image_layout():
    colours = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    img = palette_image(colours, columns=2, cell=3)
    assert img.shape == (3, 6, 6)
    # sorted by luma: black, red, white; the fourth cell stays white
    torch.testing.assert_close(img[:, 1, 1], torch.tensor([0.0, 0.0, 0.0]))
    torch.testing.assert_close(img[:, 1, 4], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(img[:, 4, 1], torch.tensor([1.0, 1.0, 1.0]))
    torch.testing.assert_close(img[:, 4, 4], torch.tensor([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        palette_image(torch.zeros(4, 2))


def test_recolour_to_gmm_moves_colours_towards_target():
    """Recolouring to the colour GMM of another image brings its colours closer to that image's."""
    src, tgt = (torch.from_numpy(np.array(Image.open(ROOT / "data" / name).resize((48, 32)))).permute(2, 0, 1) / 255
                for name in ("coffee.jpg", "rocket.jpg"))
    g = torch.Generator().manual_seed(0)
    target_gmm = colour_targets([tgt], 6, colorspace="rgb", generator=g)[0]
    out, history = recolour_to_gmm(src, target_gmm, colorspace="rgb", n_iter=40, generator=g)
    assert out.shape == src.shape and history[-1] < 0.5 * history[0]
    assert color_sliced_w2(out, tgt) < 0.5 * color_sliced_w2(src, tgt)


# --------------------------------------------------------------------------------------------- app
def _main(argv: list[str]) -> int:
    return run("barycenter", barycenter.main, argv)


def _small_images(tmp_path: Path) -> list[Path]:
    paths = []
    for name, size in (("coffee.jpg", (48, 32)), ("rocket.jpg", (40, 30)), ("chelsea.jpg", (36, 30))):
        path = tmp_path / f"{Path(name).stem}.png"
        Image.open(ROOT / "data" / name).resize(size).save(path)
        paths.append(path)
    return paths


def test_app_points_default(tmp_path):
    out = tmp_path / "points"
    assert _main(["--iters", "30", "--output", str(out), "--quiet"]) == 0
    assert Image.open(out / "barycenter.png").size[0] > 500
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_objective"] < metrics["first_objective"] - 0.5
    assert len(metrics["per_target_mw2"]) == 3
    assert metrics["final_objective"] == pytest.approx(sum(metrics["per_target_mw2"]) / 3, rel=1e-9)
    assert metrics["settings"]["k"] == 2 and metrics["settings"]["n_points"] == 500


def test_app_palette_with_recolor(tmp_path):
    a, b, c = _small_images(tmp_path)
    out = tmp_path / "palette"
    assert _main(["--mode", "palette", str(a), str(b), "--weights", "3", "1", "--k", "4", "--n-points", "200",
                  "--iters", "30", "--recolor", str(c), "--recolor-iters", "10", "--save-every", "15",
                  "--output", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.glob("frame_*.png")) == ["frame_00015.png", "frame_00030.png"]
    for name in ("palette.png", "comparison.png", "recolored.png", "metrics.json"):
        assert (out / name).is_file(), name
    assert Image.open(out / "recolored.png").size == (36, 30)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weights"] == pytest.approx([0.75, 0.25])
    assert metrics["final_objective"] < metrics["first_objective"]


def _assert_clean_failure(capsys, argv: list[str], out: Path, fragment: str) -> None:
    assert_clean_failure(_main, capsys, argv, out, fragment)


def test_app_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys):
    a, b, _ = _small_images(tmp_path)
    out = tmp_path / "never"
    _assert_clean_failure(capsys, ["--mode", "palette", str(a)], out, "two or more images")
    _assert_clean_failure(capsys, ["--mode", "palette", str(a), str(tmp_path / "missing.png")], out, "does not exist")
    _assert_clean_failure(capsys, ["--mode", "palette", str(a), str(tmp_path)], out, "directory")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    _assert_clean_failure(capsys, ["--mode", "palette", str(a), str(text)], out, str(text))
    flat = tmp_path / "flat.png"
    Image.new("RGB", (16, 16), (128, 128, 128)).save(flat)
    _assert_clean_failure(capsys, ["--mode", "palette", str(a), str(flat)], out, "distinct colours")
    _assert_clean_failure(capsys, ["--mode", "palette", str(a), str(b), "--weights", "1"], out, "--weights needs 2")
    _assert_clean_failure(capsys, ["--weights", "1", "-1", "1"], out, ">= 0")
    _assert_clean_failure(capsys, [str(a)], out, "takes no images")
    _assert_clean_failure(capsys, ["--n-points", "1"], out, "at least --k")


def test_app_bad_flags_exit_2(capsys):
    for flags in (["--k", "0"], ["--mode", "magic"], ["--iters", "-3"], ["--lr", "nan"], ["--weights", "x"]):
        assert run("app", barycenter.main, flags) == 2   # one line, no usage block
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error" in err, err


def test_app_help_is_fast_and_lazy():
    code = ("import sys, apps.barycenter as m\n"
            "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules, sorted(sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "apps.barycenter", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0 and "--mode" in proc.stdout
