"""Tests of imgmw.warm: the warm-started EM as an nn.Module and its fit-keeping policy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from imgmw import GMM, fit_gmm, mw2
from imgmw.flow import refit_mw2, run_flow
from imgmw.warm import FitPolicy, WarmStartEM, split_component


def _unequal_clusters(n: int = 400, seed: int = 0) -> torch.Tensor:
    """80 % of the points around (-3, 0), 20 % around (3, 0), float64."""
    g = torch.Generator().manual_seed(seed)
    n_a = int(0.8 * n)
    a = torch.randn(n_a, 2, generator=g, dtype=torch.float64) * 0.5 + torch.tensor([-3.0, 0.0], dtype=torch.float64)
    b = torch.randn(n - n_a, 2, generator=g, dtype=torch.float64) * 0.5 + torch.tensor([3.0, 0.0], dtype=torch.float64)
    return torch.cat([a, b])


def _two_component_target() -> GMM:
    eye = torch.eye(2, dtype=torch.float64)
    return GMM(torch.tensor([0.5, 0.5], dtype=torch.float64),
               torch.tensor([[0.0, 3.0], [0.0, -3.0]], dtype=torch.float64),
               torch.stack([0.3 * eye, torch.tensor([[1.0, 0.4], [0.4, 0.5]], dtype=torch.float64)]))


def _flow_gap(em: WarmStartEM, iters: int = 150) -> tuple[float, float]:
    """(final loss, refit MW2²) of a Wasserstein gradient flow of the 80/20 clusters towards the 50/50
    target; the refit is a maximum-likelihood fit (learned weights) of the final points."""
    x0, target = _unequal_clusters(), _two_component_target()
    result = run_flow(x0, lambda x, _: mw2(em(x), target), n_iter=iters, lr=0.05 * x0.shape[0])
    refit = refit_mw2(result.x, target, reg_covar=em.reg_covar, generator=torch.Generator().manual_seed(1))
    return result.final_loss, float(refit)


def test_policy_keeps_the_loss_describing_the_data():
    """Plain Algorithm 3 with fixed uniform weights (the paper's warm start) matches each component's
    mean and covariance but keeps the 80/20 split of the mass: the loss reports convergence while a fresh
    fit of the points is far from the 50/50 target. The default (learned weights and the fit-keeping
    policy) moves the mass too and keeps the loss within 2× of the fresh fit's."""
    plain = WarmStartEM(2, fixed_weights=True, policy=None, reg_covar=1e-3,
                        generator=torch.Generator().manual_seed(0))
    loss, refit = _flow_gap(plain)
    assert refit > 10 * max(loss, 1e-4), (loss, refit)
    kept = WarmStartEM(2, reg_covar=1e-3, generator=torch.Generator().manual_seed(0))
    loss, refit = _flow_gap(kept)
    assert refit < 2 * max(loss, 1e-4), (loss, refit)


def test_reseed_revives_a_starved_fixed_weight_component():
    """With fixed weights, a component that holds < min_mass × its weight is re-seeded by a split of the
    heaviest one on the next call, after which both components hold mass."""
    x = _unequal_clusters()
    start = GMM(torch.tensor([0.5, 0.5], dtype=torch.float64),
                torch.tensor([[-3.0, 0.0], [30.0, 30.0]], dtype=torch.float64),
                torch.eye(2, dtype=torch.float64).expand(2, 2, 2).clone())
    em = WarmStartEM(2, init=start, fixed_weights=True, n_init_iter=1, policy=FitPolicy(check_every=0))
    em(x)
    assert float(em.diagnostics.mass_ratio.min()) < 0.25
    em(x)
    assert int(em.diagnostics.reseeds) == 1
    em(x)
    assert float(em.diagnostics.mass_ratio.min()) > 0.25


def test_fresh_fit_replaces_a_worse_optimum():
    """A stored fit that puts both components on one cluster is replaced at the first check by the fresh
    fit, whose likelihood is higher; with policy=None it stays."""
    x = _unequal_clusters()
    bad = GMM(torch.tensor([0.5, 0.5], dtype=torch.float64),
              torch.tensor([[-3.2, 0.0], [-2.8, 0.0]], dtype=torch.float64),
              torch.eye(2, dtype=torch.float64).expand(2, 2, 2) * 9.0)
    for policy, replaced in ((FitPolicy(check_every=1), True), (None, False)):
        em = WarmStartEM(2, init=bad, n_init_iter=1, policy=policy, generator=torch.Generator().manual_seed(0))
        em(x)
        gmm = em(x)
        spread = float(gmm.means[:, 0].max() - gmm.means[:, 0].min())
        assert (spread > 5.0) == replaced, spread
        assert (int(em.diagnostics.refits) == 1) == replaced


def test_refine_converges_the_stored_fit():
    """max_refine EM steps (no gradient) before the differentiable step bring the fit to an EM fixed point
    of the current points: the call equals a fit from the same start with as many steps in all."""
    x = _unequal_clusters()
    start = fit_gmm(x, 2, n_iter=1, generator=torch.Generator().manual_seed(0), grad="none").gmm
    em = WarmStartEM(2, init=start, n_init_iter=1, reg_covar=1e-6,
                     policy=FitPolicy(max_refine=5, refine_tol=0.0, check_every=0))
    em(x)                                   # first call: the start plus one step (init fit)
    got = em(x)                             # 5 refine steps, then the differentiable one
    steps = int(em.diagnostics.refine_steps)
    assert 1 <= steps <= 5
    want = fit_gmm(x, 2, n_iter=2 + steps, init=start, grad="none").gmm
    torch.testing.assert_close(got.means, want.means, rtol=1e-10, atol=1e-10)


def test_state_is_a_buffer_that_round_trips_and_moves():
    x = _unequal_clusters().float()
    em = WarmStartEM(2, generator=torch.Generator().manual_seed(0))
    em(x)
    state = em.state_dict()
    assert set(state) == {"weights", "means", "covariances", "_extra_state"}  # the policy's diagnostics too
    fresh = WarmStartEM(2)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.state.means, em.state.means)
    assert fresh.diagnostics.calls == em.diagnostics.calls == 1
    torch.testing.assert_close(fresh.diagnostics.mass_ratio, em.diagnostics.mass_ratio)
    assert fresh.double().state.dtype == torch.float64
    em.reset()
    assert em.state is None and em.diagnostics.calls == 0


def test_gradient_flows_through_one_step_only():
    x = _unequal_clusters().requires_grad_(True)
    em = WarmStartEM(2, generator=torch.Generator().manual_seed(0))
    em(x)
    gmm = em(x)
    gmm.means.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert not em.state.means.requires_grad


@pytest.mark.parametrize("kwargs", [dict(max_refine=-1), dict(min_mass=1.0), dict(min_weight=1.5),
                                    dict(check_every=1.5), dict(switch_margin=float("nan"))])
def test_policy_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        FitPolicy(**kwargs)


def test_split_component_reseeds_only_starved_elements():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    cov = a @ a.mT + 0.1 * torch.eye(4, dtype=torch.float64)
    means = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    weights = torch.tensor([[0.7, 0.299, 0.001], [0.5, 0.3, 0.2]], dtype=torch.float64)
    out = split_component(GMM(weights, means, cov), torch.tensor([True, False]), weights)
    assert torch.equal(out.weights[1], weights[1]) and torch.equal(out.means[1], means[1])
    assert torch.equal(out.covariances[1], cov[1])
    # batch element 0: component 2 (the lightest) becomes half of component 0 (the heaviest)
    lam, vec = np.linalg.eigh(cov[0, 0].numpy())
    offset = 0.5 * np.sqrt(lam[-1]) * vec[:, -1]
    np.testing.assert_allclose(out.weights[0].numpy(), [0.3505, 0.299, 0.3505], rtol=1e-12)
    got = {tuple(np.round(out.means[0, k].numpy() - means[0, 0].numpy(), 10)) for k in (0, 2)}
    assert got == {tuple(np.round(s * offset, 10)) for s in (1, -1)}
    torch.testing.assert_close(out.covariances[0, 2], cov[0, 0])
    torch.testing.assert_close(out.means[0, 1], means[0, 1])
