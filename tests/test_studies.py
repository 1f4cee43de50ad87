"""The gradient studies of ``imgmw.studies`` at tiny sizes: problem generators, measures, the saved-tensor
meter, and each study's results (what they measure, not only that they run)."""
from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imgmw import GMM, fit_gmm, mw2, studies

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


class Recorder:
    """A progress hook that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, desc: str, done: int, total: int) -> None:
        self.calls.append((desc, done, total))

    def finished(self) -> set[str]:
        return {desc for desc, done, total in self.calls if done == total}


def test_library_imports_no_presentation_or_apps() -> None:
    for path in (ROOT / "imgmw" / "studies").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not {n.split(".")[0] for n in names} & {"matplotlib", "tqdm", "apps"}, (path.name, names)
    code = "import sys, imgmw.studies; assert not {'matplotlib', 'apps'} & {m.split('.')[0] for m in sys.modules}"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT)})


# --------------------------------------------------------------------------- memory meter
def test_meter_counts_the_bytes_of_saved_storages_once() -> None:
    a = torch.ones(10, dtype=F64, requires_grad=True)
    c = torch.ones(25, 4, dtype=torch.float32, requires_grad=True)
    with studies.SavedTensorMeter() as meter:
        a * a  # saves a twice: one storage of 80 bytes
    assert meter.bytes == 80
    with studies.SavedTensorMeter() as meter:
        a.exp()  # saves its output (80 bytes)
        (c[:, :1] * c[:, 1:2])  # views of one storage of 400 bytes
    assert meter.bytes == 80 + 400
    with studies.SavedTensorMeter() as meter:
        with torch.no_grad():
            a * a
    assert meter.bytes == 0
    a * a  # outside the context: not counted
    assert meter.bytes == 0


# --------------------------------------------------------------------------- problems
def test_random_rotation_is_orthogonal_with_positive_r() -> None:
    q = studies.random_rotation(5, 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q.mT @ q, torch.eye(4, dtype=F64).expand(5, 4, 4))


@pytest.mark.parametrize("sep, cond", [(1.0, 50.0), (4.0, 2.0)])
def test_random_gmm_has_requested_separation_and_condition(sep: float, cond: float) -> None:
    g = studies.random_gmm(3, 3, 4, sep, cond, torch.Generator().manual_seed(2))
    assert g.means.shape == (3, 3, 4) and g.covariances.shape == (3, 3, 4, 4)
    off = ~torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(torch.cdist(g.means, g.means)[:, off], torch.full((3, 6), sep * math.sqrt(2), dtype=F64))
    eig = torch.linalg.eigvalsh(g.covariances)
    torch.testing.assert_close(eig[..., -1] / eig[..., 0], torch.full((3, 3), cond, dtype=F64))
    torch.testing.assert_close(eig.prod(-1), torch.ones(3, 3, dtype=F64))  # determinant 1
    again = studies.random_gmm(3, 3, 4, sep, cond, torch.Generator().manual_seed(2))
    assert torch.equal(again.means, g.means) and torch.equal(again.covariances, g.covariances)


def test_random_gmm_with_more_components_than_dimensions() -> None:
    g = studies.random_gmm(2, 5, 2, 3.0, 4.0, torch.Generator().manual_seed(0))
    assert g.means.shape == (2, 5, 2)
    torch.testing.assert_close(g.weights.sum(-1), torch.ones(2, dtype=F64))


def test_shifted_target_and_losses() -> None:
    g = studies.random_gmm(2, 3, 3, 2.0, 5.0, torch.Generator().manual_seed(1))
    t = studies.shifted_target(g, shift=0.5, scale=2.0)
    torch.testing.assert_close(t.means - g.means, torch.tensor([0.5, 0.0, 0.0], dtype=F64).expand(2, 3, 3))
    torch.testing.assert_close(t.covariances, 2.0 * g.covariances)
    loss, name = studies.make_loss(t, "parameters")
    expected = 3 * 0.25 + g.covariances.square().sum((-1, -2, -3))  # ‖Σ − 2Σ‖² = ‖Σ‖²
    assert name == studies.LOSS_PARAM
    torch.testing.assert_close(loss(g), expected)
    loss, name = studies.make_loss(g)
    assert name == studies.LOSS_MW2
    torch.testing.assert_close(loss(t), mw2(t, g))
    assert float(loss(g).abs().max()) < 1e-8
    with pytest.raises(ValueError, match="loss"):
        studies.make_loss(g, "bogus")


def test_flow_and_stability_problems_are_seeded() -> None:
    x0, target = studies.flow_problem(4)
    assert x0.shape == (200, 2) and target.means.shape == (3, 2)
    assert torch.equal(studies.flow_problem(4)[0], x0) and not torch.equal(studies.flow_problem(5)[0], x0)
    truth = studies.stability_truth(2.0, 0)
    off = ~torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(torch.cdist(truth.means, truth.means)[off], torch.full((6,), 2.0, dtype=F64))


# --------------------------------------------------------------------------- measures
def test_measures() -> None:
    q = studies.quartiles(torch.tensor([4.0, 1.0, 3.0, 2.0, 5.0, float("nan"), float("inf")]))
    assert q == {"median": 3.0, "q25": 2.0, "q75": 4.0, "count": 5, "non_finite": 2}
    empty = studies.quartiles(torch.tensor([float("nan")]))
    assert empty["count"] == 0 and empty["non_finite"] == 1 and math.isnan(empty["median"])
    assert math.isclose(studies.loglog_slope([10, 100, 1000], [5.0, 0.05, 5e-4]), -2.0, rel_tol=1e-12)
    assert math.isnan(studies.loglog_slope([1, 2], [1.0, 0.0]))
    assert studies.first_below([3.0, 2.0, 0.5, 0.1], 1.0) == 2 and studies.first_below([3.0], 1.0) is None
    g, ref = torch.ones(2, 4, 3), torch.ones(2, 4, 3)
    g[1] *= 1.5
    torch.testing.assert_close(studies.relative_error(g, ref), torch.tensor([0.0, 0.5]))


def test_fixed_point_error_vanishes_at_a_converged_fit() -> None:
    gen = torch.Generator().manual_seed(0)
    truth = studies.random_gmm(2, 3, 2, 4.0, 2.0, gen)
    x, _ = truth.sample(300, generator=gen)
    start = studies.shifted_target(truth)
    done = fit_gmm(x, 3, n_iter=300, init=start).gmm
    assert studies.fixed_point_error(start, x).shape == (2,)
    assert float(studies.fixed_point_error(done, x).max()) < 1e-20 < float(studies.fixed_point_error(start, x).min())
    assert studies.theta_vector(done).shape == (2, 3 + 3 * 2 + 3 * 3)


# --------------------------------------------------------------------------- studies
def test_accuracy_study_implicit_matches_ad_at_a_converged_fit() -> None:
    progress = Recorder()
    res = studies.accuracy_study(n_points=(), n_iter=(1, 150), fixed_n_points=100, conditions=("well",), draws=2,
                                 seed=0, progress=progress)
    assert res["loss"] == studies.LOSS_MW2 and res["T_values"] == [1, 150] and res["sweep_n"] == {}
    assert progress.calls[-1] == ("accuracy", 2, 2)
    one, many = res["sweep_T"]["well"]
    assert (one["T"], many["T"], many["n"]) == (1, 150, 100)
    assert one["rel_err_one_step"]["q75"] < 1e-12  # one EM step: OS is AD
    assert many["fixed_point_error"]["q75"] < 1e-20 and many["implicit_unconverged"] == 0
    # at a fixed point the implicit gradient is AD's limit; the one-step gradient is not
    assert many["rel_err_implicit"]["q75"] < 1e-6 < 1e-2 < many["rel_err_one_step"]["q25"]
    assert many["dense_ai_vs_implicit"]["q75"] < 1e-6
    assert 0 < many["spectral_radius"]["median"] <= many["jacobian_norm"]["median"] * (1 + 1e-6)
    assert one["rel_err_implicit"]["count"] == 2


def test_flow_study_moves_points_towards_the_target() -> None:
    progress = Recorder()
    out = studies.flow_study(n_iter=4, seed=0, progress=progress)
    res = out.results
    assert set(res["modes"]) == set(studies.FLOW_MODES) == set(out.trajectories)
    assert progress.finished() == {f"flow {mode}" for mode in studies.FLOW_MODES}
    for mode, rec in res["modes"].items():
        assert out.trajectories[mode].shape == (5, 200, 2)
        assert len(rec["energies"]) == 4 and rec["energies"][-1] < rec["energies"][0], mode
        assert rec["final_energy"] < res["initial_energy"] and rec["saved_bytes_peak"] > 0
        assert set(rec["steps_to"]) == {"0.01", "0.0001", "1e-06"}
    unrolled, implicit = res["modes"]["unrolled"], res["modes"]["implicit"]
    assert unrolled["saved_bytes_peak"] > implicit["saved_bytes_peak"]  # AD keeps every EM step's graph
    assert torch.equal(out.target.means, studies.flow_problem(0)[1].means)


def test_stability_study_rows() -> None:
    progress = Recorder()
    res = studies.stability_study(n_points=(100, 400), repeats=3, n_iter=20, seed=1, progress=progress)
    assert set(res["levels"]) == set(studies.SEPARATIONS) and res["n_values"] == [100, 400]
    assert progress.finished() == {f"stability {level}" for level in studies.SEPARATIONS}
    for level, rec in res["levels"].items():
        assert rec["separation"] == studies.SEPARATIONS[level]
        assert [r["n"] for r in rec["rows"]] == [100, 400]
        assert all(r["count"] == 3 and r["median"] > 0 for r in rec["rows"])
        assert math.isfinite(rec["loglog_slope_of_median"])
    again = studies.stability_study(n_points=(100,), repeats=3, n_iter=20, seed=1)
    assert again["levels"]["moderate"]["rows"][0] == res["levels"]["moderate"]["rows"][0]


def test_scaling_study_keys_and_memory() -> None:
    progress = Recorder()
    res = studies.scaling_study(n_iter=(1, 3, 6), n_features=(3, 4), n_points_t=80, n_points_d=60,
                                unrolled_n_iter=2, converged_n_iter=20, dense_limit_bytes=200_000, progress=progress)
    assert progress.finished() == {"scaling T", "scaling d"}
    assert res["loss"] == studies.LOSS_MW2 and res["sweep_T"]["n"] == 80 and res["sweep_d"]["n"] == 60
    rows = res["sweep_T"]["rows"]
    assert [r["T"] for r in rows] == [1, 3, 6]
    keys = {"forward_s", "backward_s", "saved_forward_bytes", "saved_backward_bytes"}
    for r in rows:
        assert all(keys <= set(r[m]) for m in studies.MODES)
        assert {"solver_iterations", "solver_residual"} <= set(r["implicit"])
    unrolled = [r["unrolled"]["saved_forward_bytes"] for r in rows]
    implicit = [r["implicit"]["saved_forward_bytes"] + r["implicit"]["saved_backward_bytes"] for r in rows]
    assert all(a < b for a, b in zip(unrolled, unrolled[1:]))  # AD's memory grows with T
    assert len(set(implicit)) == 1  # the implicit gradient's does not
    assert res["sweep_d"]["em_steps"] == {"unrolled": 2, "one_step": 20, "implicit": 20}
    for r, d in zip(res["sweep_d"]["rows"], (3, 4)):
        dense = r["dense_ai"]
        assert r["d"] == d and dense["estimated_bytes"] == studies.dense_bytes(3, d, 60, 8)
        assert ("total_s" in dense) == (dense["estimated_bytes"] <= 200_000) != ("skipped" in dense)
        assert math.isfinite(r["fixed_point_error_at_t_conv"])


def test_dense_bytes_formula() -> None:
    p = 3 + 3 * 2 + 3 * 3  # weights, means, Cholesky factors of K=3, D=2
    assert studies.dense_bytes(3, 2, 10, 8) == (p * p + p * 10 * 2) * 8


def test_backward_cost_of_a_given_problem() -> None:
    x, init, loss, name = studies.scaling_problem(2, 50, 0)
    assert x.shape == (1, 50, 2) and isinstance(init, GMM) and name == studies.LOSS_MW2
    cost = studies.backward_cost("one_step", x, init, loss, 5)
    assert cost["saved_forward_bytes"] > 0 and cost["backward_s"] >= 0 and "solver_iterations" not in cost
