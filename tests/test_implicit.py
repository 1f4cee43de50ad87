"""Tests of the matrix-free implicit EM gradient (imgmw.implicit) and of fit_gmm's gradient modes.

References: full unrolled autodiff with many EM iterations (the implicit gradient is its limit once EM
has converged), finite differences of the converged EM map (gradcheck), dense Jacobians built by
``torch.func.jacrev``, and the one-step gradient written out by hand.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from imgmw import GMM, em_step, fit_gmm
from imgmw.implicit import (
    StepLinearisation,
    dense_implicit_gradient,
    dense_step_jacobians,
    implicit_em_fixed_point,
    last_solve_info,
    n_phi,
    phi_to_theta,
    step_jacobian_norm,
    step_spectral_radius,
    theta_to_phi,
)
from imgmw.studies import SavedTensorMeter

F64 = torch.float64


def clustered(batch: int, n: int, spread: float, seed: int, dtype=F64) -> torch.Tensor:
    """``[batch, n, 2]`` points around three centres at distance ``spread``, anisotropic noise."""
    g = torch.Generator().manual_seed(seed)
    centres = spread * torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=dtype)
    labels = torch.arange(n).remainder(3).expand(batch, n)
    noise = torch.randn(batch, n, 2, generator=g, dtype=dtype) * torch.tensor([1.0, 0.6], dtype=dtype)
    return centres[labels] + noise


def near_truth(batch: int, spread: float, dtype=F64) -> GMM:
    """A GMM init at the centres of :func:`clustered` (so EM cannot land in a poor local optimum)."""
    centres = spread * torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=dtype) + 0.3
    return GMM(torch.full((batch, 3), 1 / 3, dtype=dtype), centres.expand(batch, 3, 2),
               torch.eye(2, dtype=dtype).expand(batch, 3, 2, 2))


def loss_of(gmm: GMM) -> torch.Tensor:
    """A smooth loss that touches weights, means and (asymmetrically) covariances."""
    tri = torch.tensor([[1.0, 0.3], [-0.7, 2.0]], dtype=gmm.dtype)
    return ((gmm.means - 1.0).square().sum() + (gmm.covariances * tri).sin().sum()
            + (gmm.weights * torch.arange(1, gmm.n_components + 1, dtype=gmm.dtype)).square().sum())


def grad_x(x: torch.Tensor, **fit_kwargs) -> torch.Tensor:
    xx = x.clone().requires_grad_(True)
    fit_kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    res = fit_gmm(xx, 3, **fit_kwargs)
    (g,) = torch.autograd.grad(loss_of(res.gmm), xx)
    return g


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- agreement with autodiff
@pytest.mark.parametrize("solver, fixed_weights", [("gmres", False), ("gmres", True), ("cg", False),
                                                   ("fixed_point", True)])
def test_implicit_equals_unrolled_at_convergence(solver: str, fixed_weights: bool) -> None:
    x = clustered(2, 60, 4.0, seed=1)
    kw = dict(n_iter=150, tol=None, fixed_weights=fixed_weights, init=near_truth(2, 4.0))
    g_ad = grad_x(x, grad="unrolled", **kw)
    g_imp = grad_x(x, grad="implicit", implicit_options={"solver": solver, "tol": 1e-11}, **kw)
    info = last_solve_info()
    g_os = grad_x(x, grad="one_step", **kw)
    assert rel(g_imp, g_ad) < 1e-6
    assert rel(g_os, g_ad) > 1e-4  # the comparison is discriminative: OS is biased here
    assert info is not None and info.solver == solver and bool(info.converged.all())
    assert float(info.residual.max()) <= 1e-11


def test_implicit_sample_weight_gradient_equals_unrolled() -> None:
    x = clustered(1, 45, 4.0, seed=2)
    sw = torch.linspace(0.5, 1.5, 45, dtype=F64).unsqueeze(0)
    grads = {}
    for mode in ("unrolled", "implicit"):
        w = sw.clone().requires_grad_(True)
        res = fit_gmm(x, 3, n_iter=120, grad=mode, sample_weight=w, init=near_truth(1, 4.0),
                      implicit_options={"tol": 1e-11})
        (grads[mode],) = torch.autograd.grad(loss_of(res.gmm), w)
    assert rel(grads["implicit"], grads["unrolled"]) < 1e-6


def test_float32_close_to_float64() -> None:
    x = clustered(1, 60, 4.0, seed=3)
    g64 = grad_x(x, n_iter=150, grad="implicit", init=near_truth(1, 4.0), implicit_options={"tol": 1e-11})
    g32 = grad_x(x.float(), n_iter=150, grad="implicit", init=near_truth(1, 4.0, torch.float32))
    assert g32.dtype == torch.float32
    assert rel(g32.double(), g64) < 1e-3


# --------------------------------------------------------------------------- finite differences
@pytest.mark.parametrize("fixed_weights", [False, True])
def test_gradcheck_at_converged_fixed_point(fixed_weights: bool) -> None:
    x0 = clustered(1, 9, 8.0, seed=4)
    init = near_truth(1, 8.0)

    def converged_fit(x: torch.Tensor):
        res = fit_gmm(x, 3, n_iter=20, init=init, grad="implicit", fixed_weights=fixed_weights,
                      implicit_options={"tol": 1e-13})
        return res.gmm.weights, res.gmm.means, res.gmm.covariances

    x = x0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(converged_fit, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------- memory
def saved_bytes(mode: str, n_iter: int, x: torch.Tensor) -> int:
    xx = x.clone().requires_grad_(True)
    with SavedTensorMeter() as meter:
        res = fit_gmm(xx, 3, n_iter=n_iter, grad=mode, generator=torch.Generator().manual_seed(0))
        loss_of(res.gmm).backward()
    return meter.bytes


def test_implicit_memory_independent_of_iterations() -> None:
    x = clustered(2, 90, 4.0, seed=5)
    imp_short, imp_long = saved_bytes("implicit", 3, x), saved_bytes("implicit", 30, x)
    ad_short, ad_long = saved_bytes("unrolled", 3, x), saved_bytes("unrolled", 30, x)
    assert imp_short == imp_long
    assert ad_long > 5 * ad_short  # the meter does see memory that grows with T
    assert imp_long < ad_long / 5


# --------------------------------------------------------------------------- one-step mode
def test_one_step_is_the_last_step_only() -> None:
    x = clustered(2, 60, 3.0, seed=6)
    t = 8
    g_os = grad_x(x, n_iter=t, grad="one_step")
    prev = fit_gmm(x, 3, n_iter=t - 1, grad="none", generator=torch.Generator().manual_seed(0)).gmm
    xx = x.clone().requires_grad_(True)
    (g_last,) = torch.autograd.grad(loss_of(em_step(prev, xx)), xx)
    g_ad = grad_x(x, n_iter=t, grad="unrolled")
    torch.testing.assert_close(g_os, g_last, rtol=1e-12, atol=1e-12)
    assert rel(g_os, g_ad) > 1e-3


# --------------------------------------------------------------------------- dense reference and norm
def test_dense_ai_agrees_with_matrix_free() -> None:
    x = clustered(2, 30, 3.0, seed=7)  # overlapping clusters: (I − J)⁻¹ is far from I
    xx = x.clone().requires_grad_(True)
    res = fit_gmm(xx, 3, n_iter=15, grad="implicit", generator=torch.Generator().manual_seed(0),
                  implicit_options={"tol": 1e-13, "max_iter": 500})
    theta = [t.detach().requires_grad_(True) for t in (res.gmm.weights, res.gmm.means, res.gmm.covariances)]
    g_theta = torch.autograd.grad(loss_of(GMM(*theta)), theta)
    (g_free,) = torch.autograd.grad(loss_of(res.gmm), xx)
    g_dense = dense_implicit_gradient(res.gmm.detach(), x, g_theta)
    assert rel(g_dense, g_free) < 1e-9
    prev = res.gmm.detach()
    xx2 = x.clone().requires_grad_(True)
    (g_one,) = torch.autograd.grad(loss_of(em_step(prev, xx2)), xx2)
    assert rel(g_dense, g_one) > 1e-2  # the inverse matters on this problem


def test_step_jacobian_norm_matches_dense_spectral_norm() -> None:
    x = clustered(2, 30, 3.0, seed=8)
    gmm = fit_gmm(x, 3, n_iter=10, grad="none", generator=torch.Generator().manual_seed(0)).gmm
    j_phi, j_x = dense_step_jacobians(gmm, x)
    assert j_phi.shape == (2, n_phi(3, 2, False), n_phi(3, 2, False)) and j_x.shape == (2, 18, 30, 2)
    est = step_jacobian_norm(gmm, x, n_iter=500, rtol=1e-12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(est, torch.linalg.matrix_norm(j_phi, 2), rtol=1e-6, atol=0.0)


def test_linearisation_products_are_adjoint() -> None:
    x = clustered(1, 30, 3.0, seed=9)
    gmm = fit_gmm(x, 3, n_iter=5, grad="none", generator=torch.Generator().manual_seed(0)).gmm
    op = StepLinearisation(gmm, x)
    g = torch.Generator().manual_seed(1)
    u, v = (torch.randn(op.phi.shape, dtype=F64, generator=g) for _ in range(2))
    j_phi, _ = dense_step_jacobians(gmm, x)
    torch.testing.assert_close(op.vjp(u), (u.unsqueeze(-2) @ j_phi).squeeze(-2))
    torch.testing.assert_close(op.jvp(v), (j_phi @ v.unsqueeze(-1)).squeeze(-1))


# --------------------------------------------------------------------------- fallback and records
def test_fallback_warns_and_uses_one_step_gradient() -> None:
    x = clustered(2, 60, 4.0, seed=10)
    kw = dict(n_iter=150, init=near_truth(2, 4.0))  # converged, so one step at θ_T is well defined
    xx = x.clone().requires_grad_(True)
    res = fit_gmm(xx, 3, grad="implicit", implicit_options={"solver": "fixed_point", "max_iter": 1, "tol": 1e-15},
                  **kw)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        (g,) = torch.autograd.grad(loss_of(res.gmm), xx)
    info = last_solve_info()
    assert not bool(info.converged.any()) and float(info.residual.min()) > 1e-15
    xx2 = x.clone().requires_grad_(True)
    (g_one,) = torch.autograd.grad(loss_of(em_step(res.gmm.detach(), xx2)), xx2)
    torch.testing.assert_close(g, g_one, rtol=1e-9, atol=1e-12)
    g_imp = grad_x(x, grad="implicit", **kw)
    assert rel(g, g_imp) > 1e-4


def test_callback_receives_solve_record() -> None:
    x = clustered(2, 60, 4.0, seed=11)
    seen = []
    xx = x.clone().requires_grad_(True)
    res = fit_gmm(xx, 3, n_iter=60, grad="implicit", init=near_truth(2, 4.0),
                  implicit_options={"callback": seen.append, "tol": 1e-10})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_of(res.gmm).backward()
    assert len(seen) == 1 and seen[0] is last_solve_info()
    info = seen[0]
    assert info.residual.shape == (2,) and bool((info.residual <= 1e-10).all()) and info.iterations >= 1
    assert float(info.fixed_point_residual.max()) < 1e-6


def test_implicit_step_forward_equals_em_step() -> None:
    x = clustered(2, 40, 3.0, seed=12)
    prev = fit_gmm(x, 3, n_iter=3, grad="none", generator=torch.Generator().manual_seed(0)).gmm
    new, ll = implicit_em_fixed_point(prev, x, None)
    ref = em_step(prev, x)
    for a, b in ((new.weights, ref.weights), (new.means, ref.means), (new.covariances, ref.covariances)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ll, prev.log_prob(x).mean(-1))


# --------------------------------------------------------------------------- coordinates and validation
@pytest.mark.parametrize("fixed_weights", [False, True])
def test_phi_round_trip(fixed_weights: bool) -> None:
    x = clustered(2, 40, 3.0, seed=13)
    gmm = fit_gmm(x, 3, n_iter=3, grad="none", generator=torch.Generator().manual_seed(0)).gmm
    phi = theta_to_phi(gmm, fixed_weights)
    assert phi.shape == (2, n_phi(3, 2, fixed_weights))
    back = phi_to_theta(phi, 3, 2, gmm.weights if fixed_weights else None)
    torch.testing.assert_close(back.weights, gmm.weights)
    torch.testing.assert_close(back.means, gmm.means)
    torch.testing.assert_close(back.covariances, gmm.covariances)
    if not fixed_weights:
        torch.testing.assert_close(phi[..., :3].sum(-1), torch.zeros(2, dtype=F64))


@pytest.mark.parametrize("options, name", [({"solver": "newton"}, "solver"), ({"tol": -1.0}, "tol"),
                                           ({"max_iter": 0}, "max_iter"), ({"callback": 3}, "callback")])
def test_bad_options_raise(options: dict, name: str) -> None:
    x = clustered(1, 30, 3.0, seed=14)
    with pytest.raises(ValueError, match=name):
        fit_gmm(x, 3, n_iter=2, grad="implicit", implicit_options=options)


def test_spectral_radius_matches_dense_eigenvalues() -> None:
    x = clustered(2, 30, 3.0, seed=8)
    gmm = fit_gmm(x, 3, n_iter=10, grad="none", generator=torch.Generator().manual_seed(0)).gmm
    j_phi, _ = dense_step_jacobians(gmm, x)
    est = step_spectral_radius(gmm, x, n_iter=100, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(est, torch.linalg.eigvals(j_phi).abs().max(-1).values, rtol=1e-3, atol=0.0)
