"""Tests of imgmw.losses.MW2Loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from imgmw import GMM, MW2Loss, fit_gmm, mw2

F64 = torch.float64


def two_blobs(n: int, seed: int, batch: tuple[int, ...] = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[3.0, 0.0], [-2.0, 1.0]])
    labels = torch.randint(0, 2, (*batch, n), generator=g)
    return centres[labels] + 0.4 * torch.randn(*batch, n, 2, generator=g)


@pytest.mark.parametrize("warm_start, fixed_weights", [(True, True), (False, True), (False, False)])
def test_adam_steps_lower_the_loss_and_move_the_points(warm_start, fixed_weights):
    """Points from one blob flow to a two-blob target. (With learned weights, this n_iter=10 first fit and
    the warm start, the flow stopped at the 3 % mass mismatch between its first split and the target's
    weights, at 0.21 × the first loss, the fresh fit agreeing: the paper's essential stationary point.)"""
    loss_fn = MW2Loss(two_blobs(400, 0), 2, warm_start=warm_start, n_iter=10, fixed_weights=fixed_weights,
                      generator=torch.Generator().manual_seed(1))
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(2)).requires_grad_()
    opt = torch.optim.Adam([x], lr=0.05)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn(x)
        loss.backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().max()) > 0
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0]


def test_learned_weights_loss_matches_a_fresh_fit():
    """After a flow with the default loss (learned weights, fit-keeping warm start) the reported loss is the
    MW2² of a fresh fit of the points (within 10 % or 1e-4)."""
    from imgmw.flow import refit_mw2

    loss_fn = MW2Loss(two_blobs(400, 0), 2, generator=torch.Generator().manual_seed(1))
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(2)).requires_grad_()
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(120):
        opt.zero_grad()
        loss = loss_fn(x)
        loss.backward()
        opt.step()
    fresh = float(refit_mw2(x.detach(), loss_fn.target, reg_covar=loss_fn.reg_covar,
                            generator=torch.Generator().manual_seed(3)))
    assert abs(float(loss.detach()) - fresh) <= 0.1 * fresh + 1e-4, (float(loss), fresh)


def test_unbalanced_loss_decreases():
    loss_fn = MW2Loss(two_blobs(400, 3), 2, unbalanced=(10.0, 0.1), generator=torch.Generator().manual_seed(4))
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(5)).requires_grad_()
    opt = torch.optim.Adam([x], lr=0.05)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(x)
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    with torch.no_grad():
        assert float(loss_fn(x)) < 0.5 * first


def test_reg_covar_rule_is_relative_to_the_target():
    """Points: 1e-4 × the largest eigenvalue of their covariance (also the target fit's); a GMM: 1e-4 × its
    components' largest eigenvalue."""
    target = 5.0 * two_blobs(500, 6).double()
    loss_fn = MW2Loss(target, 3, generator=torch.Generator().manual_seed(7))
    top = np.linalg.eigvalsh(np.cov(target.numpy().T, bias=True)).max()
    assert loss_fn.reg_covar == pytest.approx(1e-4 * top, rel=1e-10)
    from_gmm = MW2Loss(loss_fn.target, generator=torch.Generator().manual_seed(7))
    largest = max(np.linalg.eigvalsh(c).max() for c in loss_fn.target.covariances.numpy())
    assert from_gmm.reg_covar == pytest.approx(1e-4 * largest, rel=1e-12)
    assert MW2Loss(target, 3, reg_covar=0.5).reg_covar == 0.5


@pytest.mark.parametrize("fixed_weights", [False, True])
def test_target_fit_is_fit_target_and_matches_fit_gmm(fixed_weights):
    from imgmw.losses import TARGET_ITER, TARGET_TOL

    target = two_blobs(500, 8).double()
    loss_fn = MW2Loss(target, 2, fixed_weights=fixed_weights, generator=torch.Generator().manual_seed(9))
    ref = fit_gmm(target, 2, n_iter=TARGET_ITER, tol=TARGET_TOL, fixed_weights=fixed_weights, grad="none",
                  reg_covar=loss_fn.reg_covar, generator=torch.Generator().manual_seed(9)).gmm
    torch.testing.assert_close(loss_fn.target.means, ref.means)
    torch.testing.assert_close(loss_fn.target.weights, ref.weights)
    if fixed_weights:
        torch.testing.assert_close(loss_fn.target.weights, torch.full((2,), 0.5, dtype=F64))


def test_reductions_and_batched_value_equal_mw2_of_the_fit():
    x = two_blobs(200, 10, batch=(3,)).double()
    target = fit_gmm(two_blobs(300, 11).double(), 2, n_iter=20, fixed_weights=True, grad="none",
                     generator=torch.Generator().manual_seed(12)).gmm
    per_item = MW2Loss(target, warm_start=False, reduction="none", generator=torch.Generator().manual_seed(13))
    values = per_item(x)
    assert values.shape == (3,)
    fit = fit_gmm(x, 2, n_iter=30, reg_covar=per_item.reg_covar, generator=torch.Generator().manual_seed(13)).gmm
    torch.testing.assert_close(values, mw2(fit, target))
    total = MW2Loss(target, warm_start=False, reduction="sum", generator=torch.Generator().manual_seed(13))(x)
    mean = MW2Loss(target, warm_start=False, reduction="mean", generator=torch.Generator().manual_seed(13))(x)
    torch.testing.assert_close(total, values.sum())
    torch.testing.assert_close(mean, values.mean())


def test_loss_moves_with_to_and_rejects_mismatched_inputs():
    loss_fn = MW2Loss(two_blobs(300, 14), 2, generator=torch.Generator().manual_seed(15))
    assert loss_fn.target.dtype == torch.float32
    with pytest.raises(ValueError, match="loss.to"):
        loss_fn(two_blobs(100, 16).double())
    loss_fn.to(F64)
    assert loss_fn.target.dtype == F64
    assert torch.isfinite(loss_fn(two_blobs(100, 16).double()))


def test_bad_arguments_raise_value_errors():
    target = fit_gmm(two_blobs(300, 17), 2, n_iter=5, grad="none", generator=torch.Generator().manual_seed(0)).gmm
    with pytest.raises(ValueError, match="n_components"):
        MW2Loss(target, 3)
    with pytest.raises(ValueError, match="n_components"):
        MW2Loss(two_blobs(100, 18))
    with pytest.raises(ValueError, match="reduction"):
        MW2Loss(target, reduction="max")
    with pytest.raises(ValueError, match="unbalanced"):
        MW2Loss(target, unbalanced=(1.0, -1.0))
    with pytest.raises(ValueError, match="target"):
        MW2Loss([1, 2, 3], 2)
    assert isinstance(MW2Loss(target).target, GMM)


def test_sample_weights_equal_repeated_points_and_mask_drops_points():
    """With K=1 the fit is the weighted mean and covariance, so weights must act as repetitions."""
    gen = torch.Generator().manual_seed(0)
    target = GMM(torch.ones(1, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64),
                 torch.eye(2, dtype=torch.float64).unsqueeze(0))
    x = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    counts = torch.randint(0, 4, (12,), generator=gen)
    counts[0] = 1
    loss = MW2Loss(target, warm_start=False, reg_covar=0.0, n_iter=3)
    weighted = loss(x, sample_weight=counts.double())
    repeated = loss(x.repeat_interleave(counts, dim=0))
    torch.testing.assert_close(weighted, repeated, rtol=1e-10, atol=1e-12)
    masked = loss(x, mask=counts > 0)
    kept = loss(x[counts > 0])
    torch.testing.assert_close(masked, kept, rtol=1e-10, atol=1e-12)


def test_non_finite_points_fail_in_the_linear_program_with_one_clear_error():
    """MW2Loss does not read the points' finiteness on the host before its fit (one sync per call saved); a
    NaN point still ends in one ValueError naming NaN, raised once the NaN costs reach the host."""
    g = torch.Generator().manual_seed(3)
    target = torch.randn(200, 2, generator=g, dtype=torch.float64)
    loss = MW2Loss(target, n_components=3, warm_start=True, generator=g)
    x = torch.randn(100, 2, generator=g, dtype=torch.float64)
    loss(x)
    x[7, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        loss(x)
