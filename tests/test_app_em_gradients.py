"""End-to-end tests of ``python -m apps.em_gradients`` (tiny ``--quick`` runs) and of its helpers."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from apps import em_gradients as app
from imgmw import studies

ROOT = Path(__file__).resolve().parents[1]


def run_quick(command: str, tmp_path: Path) -> dict:
    out = tmp_path / command
    assert app.main([command, "--quick", "--quiet", "--output", str(out), "--seed", "3"]) == 0
    pngs = sorted(out.glob("*.png"))
    assert pngs, f"{command} wrote no plot"
    for png in pngs:
        with Image.open(png) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    return json.loads((out / "results.json").read_text())


# --------------------------------------------------------------------------- command line
def test_help_is_fast_and_imports_no_torch() -> None:
    code = "import sys, apps.em_gradients as a; assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT)})
    res = subprocess.run([sys.executable, "-m", "apps.em_gradients", "scaling", "--help"], cwd=ROOT,
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, timeout=60)
    assert res.returncode == 0 and "--quick" in res.stdout


@pytest.mark.parametrize("argv", [["flow", "--bogus"], ["accuracy", "--draws", "0"], ["scaling", "--seed", "x"],
                                  ["stability", "--device", "tpu"]])
def test_bad_flags_give_one_error_line(argv: list[str], capsys) -> None:
    assert app.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("em_gradients: error:")


# --------------------------------------------------------------------------- helpers
def test_loglog_slope_recovers_power() -> None:
    ns = [1000, 2000, 5000, 20000]
    assert math.isclose(studies.loglog_slope(ns, [3.0 * n ** -0.5 for n in ns]), -0.5, rel_tol=1e-12)


def test_parameter_loss_fallback() -> None:
    gen = torch.Generator().manual_seed(0)
    a = studies.random_gmm(2, 3, 3, 2.0, 5.0, gen, torch.float64, torch.device("cpu"))
    b = studies.shifted_target(a)
    loss, name = studies.make_loss(b, "parameters")
    assert name == studies.LOSS_PARAM
    expected = torch.tensor([sum(float((a.means[i, k] - b.means[i, k]).square().sum())
                                 + float((a.covariances[i, k] - b.covariances[i, k]).square().sum()) for k in range(3))
                             for i in range(2)], dtype=torch.float64)
    torch.testing.assert_close(loss(a), expected)


def test_random_gmm_has_requested_geometry() -> None:
    gen = torch.Generator().manual_seed(1)
    g = studies.random_gmm(4, 3, 3, 2.5, 10.0, gen, torch.float64, torch.device("cpu"))
    dist = torch.cdist(g.means, g.means)
    off = ~torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(dist[:, off], torch.full((4, 6), 2.5 * math.sqrt(2), dtype=torch.float64))
    eig = torch.linalg.eigvalsh(g.covariances)
    torch.testing.assert_close(eig[..., -1] / eig[..., 0], torch.full((4, 3), 10.0, dtype=torch.float64))
    torch.testing.assert_close(g.weights.sum(-1), torch.ones(4, dtype=torch.float64))


# --------------------------------------------------------------------------- quick runs of every sub-command
@pytest.mark.slow
def test_accuracy_quick(tmp_path: Path) -> None:
    res = run_quick("accuracy", tmp_path)
    assert res["loss"] == studies.LOSS_MW2
    rows = [r for sweep in ("sweep_n", "sweep_T") for rs in res[sweep].values() for r in rs]
    assert len(rows) == 2 * (len(res["n_values"]) + len(res["T_values"]))
    for r in rows:
        assert r["dense_ai_vs_implicit"]["median"] < 1e-5  # the two implicit gradients agree
        if r["T"] == 1:
            assert r["rel_err_one_step"]["q75"] < 1e-12  # with one step, OS is AD
    assert (tmp_path / "accuracy" / "accuracy_vs_n.png").exists()


@pytest.mark.slow
def test_flow_quick(tmp_path: Path) -> None:
    res = run_quick("flow", tmp_path)
    assert set(res["modes"]) == {"unrolled", "one_step", "implicit", "warm_start"}
    for mode, rec in res["modes"].items():
        assert rec["final_energy"] < res["initial_energy"] / 4, mode
        assert len(rec["energies"]) == res["iters"] and rec["saved_bytes_peak"] > 0


def test_stability_quick(tmp_path: Path) -> None:
    res = run_quick("stability", tmp_path)
    assert set(res["levels"]) == set(studies.SEPARATIONS)
    for rec in res["levels"].values():
        assert [r["n"] for r in rec["rows"]] == res["n_values"]
        assert all(r["median"] > 0 and r["count"] == res["repeats"] for r in rec["rows"])


@pytest.mark.slow
def test_scaling_quick(tmp_path: Path) -> None:
    res = run_quick("scaling", tmp_path)
    rows = res["sweep_T"]["rows"]
    implicit = [r["implicit"]["saved_forward_bytes"] + r["implicit"]["saved_backward_bytes"] for r in rows]
    unrolled = [r["unrolled"]["saved_forward_bytes"] for r in rows]
    assert len(set(implicit)) == 1  # flat in T
    assert all(a < b for a, b in zip(unrolled, unrolled[1:]))  # grows with T
    assert all("total_s" in r["dense_ai"] or "skipped" in r["dense_ai"] for r in res["sweep_d"]["rows"])
