"""Tests of the batched :class:`imgmw.GMM` container against SciPy's Gaussian densities."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from torch.autograd import gradcheck

from imgmw import GMM

F64 = torch.float64


def _random_gmm(batch: tuple[int, ...], k: int, d: int, seed: int, dtype: torch.dtype = F64) -> GMM:
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(*batch, k, generator=gen, dtype=dtype) + 0.2
    means = 3 * torch.randn(*batch, k, d, generator=gen, dtype=dtype)
    a = torch.randn(*batch, k, d, d, generator=gen, dtype=dtype)
    return GMM(weights / weights.sum(-1, keepdim=True), means, a @ a.mT + 0.5 * torch.eye(d, dtype=dtype))


def _scipy_log_prob(g: GMM, x: torch.Tensor) -> np.ndarray:
    """``log Σ_k w_k N(x | m_k, Σ_k)`` for one (unbatched) mixture, from SciPy pdfs."""
    comp = np.stack([np.log(float(g.weights[k])) + multivariate_normal(g.means[k].numpy(), g.covariances[k].numpy())
                     .logpdf(x.numpy()) for k in range(g.n_components)], axis=-1)
    return logsumexp(comp, axis=-1)


@pytest.mark.parametrize("k,d", [(1, 1), (1, 4), (3, 2), (4, 5)])
def test_log_prob_matches_scipy(k, d):
    g = _random_gmm((), k, d, seed=k * 10 + d)
    x = 2 * torch.randn(30, d, generator=torch.Generator().manual_seed(1), dtype=F64)
    np.testing.assert_allclose(g.log_prob(x).numpy(), _scipy_log_prob(g, x), rtol=1e-12, atol=1e-12)


def test_component_log_prob_matches_scipy():
    g = _random_gmm((), 3, 3, seed=2)
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    expected = np.stack([np.log(float(g.weights[k])) + multivariate_normal(g.means[k].numpy(), g.covariances[k].numpy())
                         .logpdf(x.numpy()) for k in range(3)], axis=-1)
    np.testing.assert_allclose(g.component_log_prob(x).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_cached_factors_are_consistent():
    g = _random_gmm((2,), 3, 4, seed=3)
    chol, prec = g.cholesky, g.precision_cholesky
    assert torch.allclose(chol @ chol.mT, g.covariances, atol=1e-12)
    assert torch.allclose(prec @ prec.mT, torch.linalg.inv(g.covariances), atol=1e-10)
    assert torch.allclose(g.log_det_covariances, torch.linalg.slogdet(g.covariances).logabsdet, atol=1e-12)
    assert torch.equal(torch.tril(chol), chol) and torch.equal(torch.triu(prec), prec)


def test_batched_log_prob_equals_per_item():
    g = _random_gmm((2, 3), 3, 2, seed=4)
    x = torch.randn(2, 3, 25, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    out = g.log_prob(x)
    assert out.shape == (2, 3, 25)
    for i in range(2):
        for j in range(3):
            item = g[i, j]
            assert item.batch_shape == ()
            np.testing.assert_allclose(out[i, j].numpy(), _scipy_log_prob(item, x[i, j]), rtol=1e-12, atol=1e-12)


def test_log_prob_broadcasts_unbatched_points_against_a_batch():
    g = _random_gmm((3,), 2, 2, seed=5)
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    out = g.log_prob(x.expand(3, 10, 2))
    for b in range(3):
        np.testing.assert_allclose(out[b].numpy(), _scipy_log_prob(g[b], x), rtol=1e-12)


def test_log_prob_rejects_wrong_feature_count():
    g = _random_gmm((), 2, 3, seed=6)
    with pytest.raises(ValueError, match="points must be"):
        g.log_prob(torch.zeros(5, 2, dtype=F64))
    with pytest.raises(ValueError, match="points must be"):
        g.log_prob(torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("weights,means,cov,match", [
    ((2,), (3, 2), (3, 2, 2), "weights"),
    ((3,), (3, 2), (3, 2, 3), "covariances"),
    ((3,), (2,), (2, 2), "means"),
])
def test_constructor_rejects_inconsistent_shapes(weights, means, cov, match):
    with pytest.raises(ValueError, match=match):
        GMM(torch.ones(weights, dtype=F64), torch.zeros(means, dtype=F64), torch.ones(cov, dtype=F64))


def test_constructor_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="dtype"):
        GMM(torch.ones(2), torch.zeros(2, 2, dtype=F64), torch.eye(2, dtype=F64).expand(2, 2, 2))


def test_sample_shapes_labels_and_component_means():
    g = _random_gmm((2,), 3, 2, seed=7)
    x, labels = g.sample(6000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 6000, 2) and labels.shape == (2, 6000) and x.dtype == F64
    assert int(labels.min()) >= 0 and int(labels.max()) < 3
    for b in range(2):
        freq = torch.bincount(labels[b], minlength=3).to(F64) / 6000
        assert torch.allclose(freq, g.weights[b], atol=0.03), (freq, g.weights[b])
        for k in range(3):
            pts = x[b][labels[b] == k]
            # 5 standard errors of the mean per coordinate
            se = (g.covariances[b, k].diagonal() / len(pts)).sqrt()
            assert bool(((pts.mean(0) - g.means[b, k]).abs() < 5 * se).all())
            true_cov = g.covariances[b, k]
            assert torch.allclose(torch.cov(pts.T), true_cov, rtol=0.15, atol=0.15 * float(true_cov.abs().max()))


def test_sample_is_seeded():
    g = _random_gmm((), 3, 2, seed=8)
    a = g.sample(50, generator=torch.Generator().manual_seed(3))
    b = g.sample(50, generator=torch.Generator().manual_seed(3))
    c = g.sample(50, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert g.sample(0)[0].shape == (0, 2)
    with pytest.raises(ValueError, match="n must be"):
        g.sample(-1)


def test_to_float32_detach_and_indexing():
    g = _random_gmm((3,), 2, 2, seed=9)
    x = torch.randn(3, 7, 2, generator=torch.Generator().manual_seed(9), dtype=F64)
    g32 = g.to(torch.float32)
    assert g32.dtype == torch.float32 and g32.weights.dtype == g32.covariances.dtype == torch.float32
    lp32 = g32.log_prob(x.float())
    assert lp32.dtype == torch.float32
    assert torch.allclose(lp32.double(), g.log_prob(x), rtol=1e-5, atol=1e-5)

    gg = GMM(*(t.clone().requires_grad_() for t in (g.weights, g.means, g.covariances)))
    _ = gg.precision_cholesky, gg.log_det_covariances  # fill the cache before detaching
    d = gg.detach()
    assert gg.precision_cholesky.requires_grad
    for t in (d.weights, d.means, d.covariances, d.cholesky, d.precision_cholesky, d.log_det_covariances):
        assert not t.requires_grad
    assert torch.equal(d.means, g.means) and torch.equal(d.precision_cholesky, gg.precision_cholesky.detach())

    item = g[1]
    assert item.batch_shape == () and torch.equal(item.covariances, g.covariances[1])
    assert torch.allclose(item.log_prob(x[1]), g.log_prob(x)[1], rtol=1e-14)
    sub = g[1:]
    assert sub.batch_shape == (2,)
    with pytest.raises(IndexError):
        g[0, 0]
    back = GMM.stack([g[i] for i in range(3)])
    assert torch.equal(back.means, g.means) and torch.equal(back.covariances, g.covariances)


def test_cholesky_jitter_on_a_singular_covariance_gives_finite_log_prob():
    v = torch.tensor([[1.0], [2.0], [-1.0]], dtype=F64)
    singular = (v @ v.T)[None]  # rank one
    g = GMM(torch.ones(1, dtype=F64), torch.zeros(1, 3, dtype=F64), singular)
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(10), dtype=F64)
    lp = g.log_prob(torch.cat([x, 0.5 * v.T]))  # off and on the support
    assert bool(torch.isfinite(lp).all())
    assert torch.allclose(g.cholesky @ g.cholesky.mT, singular, atol=1e-6)  # only a small jitter was added
    assert float(lp[-1]) > float(lp[:-1].max())  # the point on the support is by far the most likely


def test_non_finite_covariance_raises():
    cov = torch.eye(2, dtype=F64)[None].clone()
    cov[0, 0, 0] = float("nan")
    g = GMM(torch.ones(1, dtype=F64), torch.zeros(1, 2, dtype=F64), cov)
    with pytest.raises(ValueError, match="not positive definite"):
        g.log_prob(torch.zeros(3, 2, dtype=F64))


def test_zero_covariance_raises_naming_reg_covar():
    g = GMM(torch.ones(1, dtype=F64), torch.zeros(1, 2, dtype=F64), torch.zeros(1, 2, 2, dtype=F64))
    with pytest.raises(ValueError, match="reg_covar"):
        g.log_prob(torch.zeros(3, 2, dtype=F64))


def test_gradcheck_log_prob_wrt_points_and_parameters():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(6, 2, generator=gen, dtype=F64, requires_grad=True)
    logits = torch.randn(2, generator=gen, dtype=F64, requires_grad=True)
    means = torch.randn(2, 2, generator=gen, dtype=F64, requires_grad=True)
    a = (torch.eye(2, dtype=F64) + 0.3 * torch.randn(2, 2, 2, generator=gen, dtype=F64)).requires_grad_()

    def fn(x, logits, means, a):
        return GMM(torch.softmax(logits, -1), means, a @ a.mT + 0.2 * torch.eye(2, dtype=F64)).log_prob(x)

    assert gradcheck(fn, (x, logits, means, a))


def test_every_lazy_export_resolves():
    import imgmw

    for name in imgmw.__all__:
        assert getattr(imgmw, name) is not None, name


def test_from_cholesky_keeps_the_factor_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    chol = torch.linalg.cholesky(torch.eye(3, dtype=torch.float64) * 2 + 0.1).expand(2, 3, 3).clone()
    chol.requires_grad_(True)
    gmm = GMM.from_cholesky(torch.tensor([0.3, 0.7], dtype=torch.float64), torch.randn(2, 3, generator=g,
                                                                                        dtype=torch.float64), chol)
    assert gmm.cholesky is chol
    torch.testing.assert_close(gmm.covariances, chol @ chol.mT)
    gmm.log_det_covariances.sum().backward()
    torch.testing.assert_close(chol.grad, torch.diag_embed(2 / torch.diagonal(chol.detach(), dim1=-2, dim2=-1)))


def test_all_finite_without_temporaries():
    from imgmw.linalg import all_finite

    x = torch.randn(1000, 7)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[123, 4] = bad
        assert not all_finite(y)
    both = x.clone()
    both[0, 0], both[1, 1] = float("inf"), -float("inf")  # the sum is NaN, not inf
    assert not all_finite(both)
    huge = torch.full((10,), 1e308, dtype=torch.float64)  # finite entries whose sum overflows
    assert all_finite(huge)
    huge[3] = float("nan")
    assert not all_finite(huge)
    assert all_finite(torch.arange(5))
