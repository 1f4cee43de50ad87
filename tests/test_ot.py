"""Tests of imgmw.bures and imgmw.ot against POT, SciPy, closed forms and finite differences."""
from __future__ import annotations

import numpy as np
import ot
import pytest
import scipy.linalg
import torch

import imgmw.bures as bures
import imgmw.ot.checks as checks
from imgmw import GMM, fit_gmm, gaussian_w2_cost, gmm_barycentre, gmm_ot_map, gmm_ot_plan, mw2

F64 = torch.float64


def random_gmm(k: int, d: int, batch: tuple[int, ...] = (), seed: int = 0, spread: float = 1.0,
               dtype: torch.dtype = F64) -> GMM:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, k, d, d, generator=g, dtype=F64) / d**0.5
    w = torch.rand(*batch, k, generator=g, dtype=F64) + 0.2
    m = spread * torch.randn(*batch, k, d, generator=g, dtype=F64)
    gmm = GMM(w / w.sum(-1, keepdim=True), m, a @ a.mT + 0.1 * torch.eye(d, dtype=F64))
    return gmm.to(dtype)


def np_params(g: GMM) -> tuple[np.ndarray, ...]:
    return g.means.detach().numpy(), g.covariances.detach().numpy(), g.weights.detach().numpy()


def pot_loss(a: GMM, b: GMM) -> float:
    (ma, ca, wa), (mb, cb, wb) = np_params(a), np_params(b)
    return float(ot.gmm.gmm_ot_loss(ma, mb, ca, cb, wa, wb))


# --------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("k0,k1,d", [(4, 5, 3), (10, 8, 27), (6, 6, 75)])
def test_value_matches_pot(k0, k1, d):
    a, b = random_gmm(k0, d, seed=1), random_gmm(k1, d, seed=2)
    assert abs(float(mw2(a, b)) - pot_loss(a, b)) < 1e-10


def test_batched_and_broadcast_values_match_pot():
    a, b = random_gmm(4, 3, (2, 3), seed=3), random_gmm(5, 3, (3,), seed=4)
    value = mw2(a, b)
    assert value.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert abs(float(value[i, j]) - pot_loss(a[i, j], b[j])) < 1e-10


@pytest.mark.parametrize("d", [1, 3, 12])
def test_cost_matches_pot_bures_wasserstein(d):
    a, b = random_gmm(3, d, seed=5), random_gmm(4, d, seed=6)
    (ma, ca, _), (mb, cb, _) = np_params(a), np_params(b)
    ref = ot.gaussian.bures_wasserstein_distance(ma, mb, ca, cb) ** 2
    np.testing.assert_allclose(gaussian_w2_cost(a, b).numpy(), ref, rtol=0, atol=1e-10)


def test_cost_matches_scipy_sqrtm():
    a, b = random_gmm(1, 5, seed=7), random_gmm(1, 5, seed=8)
    ca, cb = a.covariances[0].numpy(), b.covariances[0].numpy()
    root = scipy.linalg.sqrtm(ca)
    ref = (np.sum((a.means[0] - b.means[0]).numpy() ** 2) + np.trace(ca) + np.trace(cb)
           - 2 * np.trace(scipy.linalg.sqrtm(root @ cb @ root)).real)
    assert abs(float(gaussian_w2_cost(a, b)[0, 0]) - ref) < 1e-10


@pytest.mark.parametrize("upstream", ["dense", "sparse"])
def test_chunked_cost_and_gradient_equal_unchunked(monkeypatch, upstream):
    a, b = random_gmm(5, 4, (2,), seed=9), random_gmm(3, 4, (2,), seed=10)
    weight = torch.rand(2, 5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    if upstream == "sparse":
        weight = weight * (weight > 0.7)

    def value_and_grads():
        ca, cb = a.covariances.clone().requires_grad_(), b.covariances.clone().requires_grad_()
        cost = gaussian_w2_cost(GMM(a.weights, a.means, ca), GMM(b.weights, b.means, cb))
        (cost * weight).sum().backward()
        return cost.detach(), ca.grad, cb.grad

    full = value_and_grads()
    monkeypatch.setattr(bures, "PAIR_CHUNK_ELEMENTS", 1)  # one row k (or one pair) per chunk
    monkeypatch.setattr(bures, "DENSE_BACKWARD_ELEMENTS", 0)
    for got, ref in zip(value_and_grads(), full):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_symmetry_and_zero_on_identical():
    a, b = random_gmm(4, 3, seed=11), random_gmm(6, 3, seed=12)
    assert abs(float(mw2(a, b)) - float(mw2(b, a))) < 1e-10
    assert abs(float(mw2(a, a))) < 1e-10
    assert float(mw2(a, b)) > 0.1


@pytest.mark.parametrize("seed", range(5))
def test_triangle_inequality(seed):
    a, b, c = (random_gmm(k, 2, seed=10 * seed + i, spread=2.0) for i, k in enumerate((3, 4, 2)))
    ab, bc, ac = (float(mw2(x, y)) ** 0.5 for x, y in ((a, b), (b, c), (a, c)))
    assert ac <= ab + bc + 1e-12


def test_plan_is_a_coupling_and_optimal():
    a, b = random_gmm(5, 3, seed=13), random_gmm(4, 3, seed=14)
    plan = gmm_ot_plan(a, b)
    torch.testing.assert_close(plan.sum(-1), a.weights, rtol=0, atol=1e-12)
    torch.testing.assert_close(plan.sum(-2), b.weights, rtol=0, atol=1e-12)
    assert bool((plan >= 0).all())
    assert abs(float((plan * gaussian_w2_cost(a, b)).sum()) - pot_loss(a, b)) < 1e-10


def test_float32_keeps_dtype_and_value():
    a, b = random_gmm(3, 3, seed=15, dtype=torch.float32), random_gmm(3, 3, seed=16, dtype=torch.float32)
    value = mw2(a, b)
    assert value.dtype == torch.float32
    assert abs(float(value) - float(mw2(a.to(F64), b.to(F64)))) < 1e-4


# --------------------------------------------------------------------------------------------- gradients
def spd(a: torch.Tensor) -> torch.Tensor:
    return a @ a.mT + torch.eye(a.shape[-1], dtype=a.dtype)


@pytest.mark.parametrize("dense", [True, False], ids=["dense-backward", "support-backward"])
def test_gradcheck_means_covariances_weights(monkeypatch, dense):
    if not dense:
        monkeypatch.setattr(bures, "DENSE_BACKWARD_ELEMENTS", 0)
    g = torch.Generator().manual_seed(17)
    b = random_gmm(5, 2, seed=18, spread=2.0)  # a 3×5 plan has at most 7 of 15 entries non-zero
    logits = torch.randn(3, generator=g, dtype=F64, requires_grad=True)
    means = (2 * torch.randn(3, 2, generator=g, dtype=F64)).requires_grad_()
    factors = torch.randn(3, 2, 2, generator=g, dtype=F64, requires_grad=True)
    cov_b = torch.randn(5, 2, 2, generator=g, dtype=F64, requires_grad=True)

    def value(logits, means, factors, cov_b):
        a = GMM(torch.softmax(logits, -1), means, spd(factors))
        return mw2(a, GMM(b.weights, b.means, spd(cov_b)))

    assert torch.autograd.gradcheck(value, (logits, means, factors, cov_b))


@pytest.mark.parametrize("dense", [True, False], ids=["dense-backward", "support-backward"])
def test_gradcheck_pairwise_cost(monkeypatch, dense):
    if not dense:
        monkeypatch.setattr(bures, "DENSE_BACKWARD_ELEMENTS", 0)
    g = torch.Generator().manual_seed(27)
    means_a = torch.randn(2, 3, generator=g, dtype=F64, requires_grad=True)
    factors_a = torch.randn(2, 3, 3, generator=g, dtype=F64, requires_grad=True)
    factors_b = torch.randn(3, 3, 3, generator=g, dtype=F64, requires_grad=True)
    means_b = torch.randn(3, 3, generator=g, dtype=F64)

    def cost(means_a, factors_a, factors_b):
        a = GMM(torch.full((2,), 0.5, dtype=F64), means_a, spd(factors_a))
        return gaussian_w2_cost(a, GMM(torch.full((3,), 1 / 3, dtype=F64), means_b, spd(factors_b)))

    assert torch.autograd.gradcheck(cost, (means_a, factors_a, factors_b))


@pytest.mark.parametrize("dense", [True, False], ids=["dense-backward", "support-backward"])
def test_gradcheck_broadcast_batches_on_both_sides(monkeypatch, dense):
    """Batch shapes (2, 1) and (3,) broadcast to (2, 3); the gradients of the broadcast inputs are summed."""
    if not dense:
        monkeypatch.setattr(bures, "DENSE_BACKWARD_ELEMENTS", 0)
    g = torch.Generator().manual_seed(66)
    means_a = torch.randn(2, 1, 3, 2, generator=g, dtype=F64, requires_grad=True)
    factors_a = torch.randn(2, 1, 3, 2, 2, generator=g, dtype=F64, requires_grad=True)
    means_b = torch.randn(3, 4, 2, generator=g, dtype=F64, requires_grad=True)
    factors_b = torch.randn(3, 4, 2, 2, generator=g, dtype=F64, requires_grad=True)
    weights_b = torch.softmax(torch.randn(3, 4, generator=g, dtype=F64), -1).requires_grad_()

    def value(means_a, factors_a, means_b, factors_b, weights_b):
        a = GMM(torch.full((2, 1, 3), 1 / 3, dtype=F64), means_a, spd(factors_a))
        return mw2(a, GMM(weights_b / weights_b.sum(-1, keepdim=True), means_b, spd(factors_b)))

    assert value(means_a, factors_a, means_b, factors_b, weights_b).shape == (2, 3)
    assert torch.autograd.gradcheck(value, (means_a, factors_a, means_b, factors_b, weights_b))


def test_gradcheck_batched_broadcast():
    g = torch.Generator().manual_seed(19)
    b = random_gmm(3, 2, seed=20)
    means = torch.randn(2, 3, 2, generator=g, dtype=F64, requires_grad=True)
    factors = torch.randn(3, 2, 2, generator=g, dtype=F64, requires_grad=True)  # shared across the batch

    def value(means, factors):
        return mw2(GMM(torch.full((2, 3), 1 / 3, dtype=F64), means, spd(factors).expand(2, 3, 2, 2)), b)

    assert torch.autograd.gradcheck(value, (means, factors))


@pytest.mark.parametrize("lams", [(1.0, 2.0), (10.0, 0.1)])
def test_gradcheck_unbalanced(lams):
    g = torch.Generator().manual_seed(21)
    b = random_gmm(4, 2, seed=22)
    weights = (torch.rand(3, generator=g, dtype=F64) + 0.2).requires_grad_()  # unnormalised masses are fine
    means = torch.randn(3, 2, generator=g, dtype=F64, requires_grad=True)
    factors = torch.randn(3, 2, 2, generator=g, dtype=F64, requires_grad=True)

    def value(weights, means, factors):
        return mw2(GMM(weights, means, spd(factors)), b, unbalanced=lams)

    assert torch.autograd.gradcheck(value, (weights, means, factors))


def test_weight_gradient_is_centred():
    a, b = random_gmm(4, 2, seed=23), random_gmm(5, 2, seed=24)
    wa, wb = a.weights.clone().requires_grad_(), b.weights.clone().requires_grad_()
    mw2(GMM(wa, a.means, a.covariances), GMM(wb, b.means, b.covariances)).backward()
    assert abs(float(wa.grad.sum())) < 1e-12 and abs(float(wb.grad.sum())) < 1e-12


def test_cost_gradient_finite_for_identical_identity_covariances():
    eye = torch.eye(3, dtype=F64).expand(4, 3, 3).clone().requires_grad_()
    means = torch.randn(4, 3, generator=torch.Generator().manual_seed(25), dtype=F64, requires_grad=True)
    a = GMM(torch.full((4,), 0.25, dtype=F64), means, eye)
    value = mw2(a, a.detach())
    value.backward()
    # MW2² has its minimum (0) at identical inputs: the gradient is finite and zero
    assert torch.isfinite(eye.grad).all() and torch.isfinite(means.grad).all()
    assert float(eye.grad.abs().max()) < 1e-10 and float(means.grad.abs().max()) < 1e-10
    cost = gaussian_w2_cost(GMM(a.weights, means, eye), a.detach())
    (cost * torch.rand(4, 4, dtype=F64)).sum().backward()
    assert torch.isfinite(eye.grad).all()


def test_gradient_finite_for_rank_deficient_plus_jitter():
    g = torch.Generator().manual_seed(26)
    v = torch.randn(2, 3, 1, generator=g, dtype=F64)
    cov = (v @ v.mT + 1e-9 * torch.eye(3, dtype=F64)).requires_grad_()  # rank one plus jitter
    a = GMM(torch.full((2,), 0.5, dtype=F64), torch.randn(2, 3, generator=g, dtype=F64), cov)
    b = GMM(torch.full((2,), 0.5, dtype=F64), torch.randn(2, 3, generator=g, dtype=F64),
            (v.flip(0) @ v.flip(0).mT + 1e-9 * torch.eye(3, dtype=F64)).requires_grad_())
    value = mw2(a, b)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(cov.grad).all() and torch.isfinite(b.covariances.grad).all()


# --------------------------------------------------------------------------------------------- unbalanced
def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * np.log(p / q) - p + q))


def test_unbalanced_tends_to_balanced():
    a, b = random_gmm(4, 2, seed=27, spread=0.7), random_gmm(5, 2, seed=28, spread=0.7)
    balanced = float(mw2(a, b))
    value = float(mw2(a, b, unbalanced=(1e4, 1e4)))
    assert value <= balanced + 1e-12  # the balanced plan is feasible with zero KL terms
    assert balanced - value < 1e-3


@pytest.mark.parametrize("lams", [(1.0, 2.0), (10.0, 0.1), (50.0, 50.0)])
def test_unbalanced_plan_satisfies_optimality(lams):
    a, b = random_gmm(5, 2, seed=29), random_gmm(4, 2, seed=30)
    plan = gmm_ot_plan(a, b, unbalanced=lams).numpy()
    cost = gaussian_w2_cost(a, b).numpy()
    f = -lams[0] * np.log(plan.sum(1) / a.weights.numpy())
    g = -lams[1] * np.log(plan.sum(0) / b.weights.numpy())
    reduced = cost - f[:, None] - g[None, :]  # KKT: >= 0 everywhere, = 0 where P > 0
    assert reduced.min() > -1e-9
    assert np.abs(reduced[plan > 1e-12]).max() < 1e-9


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # POT's L-BFGS-B call uses a deprecated SciPy option
def test_unbalanced_value_matches_pot_solver():
    a, b = random_gmm(5, 2, seed=31), random_gmm(4, 2, seed=32)
    lams = (1.0, 2.0)
    cost = gaussian_w2_cost(a, b).numpy()
    wa, wb = a.weights.numpy(), b.weights.numpy()
    plan = ot.unbalanced.lbfgsb_unbalanced(wa, wb, cost, 0.0, lams)
    ref = float((plan * cost).sum()) + lams[0] * kl(plan.sum(1), wa) + lams[1] * kl(plan.sum(0), wb)
    value = float(mw2(a, b, unbalanced=lams))
    assert value <= ref + 1e-10  # we are at least as good as POT's solver ...
    assert ref - value < 1e-6  # ... and agree with it to its precision


def test_unbalanced_is_robust_to_an_outlier_component():
    a = random_gmm(3, 3, seed=33, spread=2.0)
    far = GMM(torch.cat([0.95 * a.weights, torch.tensor([0.05], dtype=F64)]),
              torch.cat([a.means, torch.full((1, 3), 60.0, dtype=F64)]),
              torch.cat([a.covariances, torch.eye(3, dtype=F64)[None]]))
    lams = (10.0, 0.1)
    shift_balanced = float(mw2(a, far)) - float(mw2(a, a))
    shift_unbalanced = float(mw2(a, far, unbalanced=lams)) - float(mw2(a, a, unbalanced=lams))
    assert shift_balanced > 100.0
    assert shift_unbalanced < 0.01 * shift_balanced


# --------------------------------------------------------------------------------------------- maps
def test_maps_of_a_gmm_onto_itself_are_the_identity():
    a = random_gmm(4, 3, seed=34, spread=3.0)
    x, _ = a.sample(500, torch.Generator().manual_seed(0))
    torch.testing.assert_close(gmm_ot_map(x, a, a), x, rtol=0, atol=1e-10)
    torch.testing.assert_close(gmm_ot_map(x, a, a, "rand", torch.Generator().manual_seed(1)), x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["bary", "rand"])
def test_single_gaussian_maps_equal_the_monge_map(method):
    s, t = random_gmm(1, 3, seed=35), random_gmm(1, 3, seed=36)
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    lin, shift = ot.gaussian.bures_wasserstein_mapping(s.means[0].numpy(), t.means[0].numpy(),
                                                       s.covariances[0].numpy(), t.covariances[0].numpy())
    out = gmm_ot_map(x, s, t, method, torch.Generator().manual_seed(3))
    np.testing.assert_allclose(out.numpy(), x.numpy() @ lin + shift, rtol=0, atol=1e-10)


def test_bary_map_matches_pot_and_chunking():
    s, t = random_gmm(3, 2, seed=37, spread=2.0), random_gmm(4, 2, seed=38, spread=2.0)
    x, _ = s.sample(200, torch.Generator().manual_seed(4))
    (ms, cs, ws), (mt, ct, wt) = np_params(s), np_params(t)
    ref = ot.gmm.gmm_ot_apply_map(x.numpy(), ms, mt, cs, ct, ws, wt, method="bary")
    np.testing.assert_allclose(gmm_ot_map(x, s, t).numpy(), ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(gmm_ot_map(x, s, t, chunk_size=7), gmm_ot_map(x, s, t), rtol=0, atol=1e-12)


def test_maps_are_batched_and_differentiable_in_x():
    s, t = random_gmm(3, 2, (2,), seed=39), random_gmm(3, 2, (2,), seed=40)
    x = torch.randn(2, 50, 2, generator=torch.Generator().manual_seed(5), dtype=F64, requires_grad=True)
    out = gmm_ot_map(x, s, t)
    torch.testing.assert_close(out[1], gmm_ot_map(x[1], s[1], t[1]), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: gmm_ot_map(x, s, t), (x[:, :5].detach().requires_grad_(),))


def test_rand_map_pushes_the_source_onto_the_target():
    s, t = random_gmm(3, 2, seed=41, spread=4.0), random_gmm(3, 2, seed=42, spread=4.0)
    x, _ = s.sample(20000, torch.Generator().manual_seed(6))
    y = gmm_ot_map(x, s, t, "rand", torch.Generator().manual_seed(7))
    fit = fit_gmm(y, 3, n_iter=100, generator=torch.Generator().manual_seed(8)).gmm
    assert float(mw2(fit, t)) < 0.02 * float(mw2(s, t))


def test_rand_map_is_deterministic_for_a_seed():
    s, t = random_gmm(3, 2, seed=43), random_gmm(2, 2, seed=44)
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(9), dtype=F64)
    one = gmm_ot_map(x, s, t, "rand", torch.Generator().manual_seed(10))
    two = gmm_ot_map(x, s, t, "rand", torch.Generator().manual_seed(10))
    assert torch.equal(one, two)


# --------------------------------------------------------------------------------------------- barycentres
def test_barycentre_of_a_gmm_with_itself_is_itself():
    a = random_gmm(4, 3, seed=45, spread=3.0)
    bary = gmm_barycentre([a, a], [0.3, 0.7])
    torch.testing.assert_close(bary.means, a.means, rtol=0, atol=1e-10)
    torch.testing.assert_close(bary.covariances, a.covariances, rtol=0, atol=1e-10)
    torch.testing.assert_close(bary.weights, a.weights)


def test_single_gaussian_barycentre_matches_pot():
    gmms = [random_gmm(1, 3, seed=46 + i) for i in range(3)]
    lam = np.array([0.2, 0.5, 0.3])
    mean, cov = ot.gaussian.bures_wasserstein_barycenter(
        np.stack([g.means[0].numpy() for g in gmms]), np.stack([g.covariances[0].numpy() for g in gmms]), lam,
        num_iter=10000, eps=1e-13)
    bary = gmm_barycentre(gmms, torch.tensor(lam))
    np.testing.assert_allclose(bary.means[0].numpy(), mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(bary.covariances[0].numpy(), cov, rtol=0, atol=1e-9)


def test_barycentre_lowers_the_objective_and_accepts_stacked_input():
    gmms = [random_gmm(3, 2, (2,), seed=50 + i, spread=3.0) for i in range(3)]
    bary = gmm_barycentre(GMM.stack(gmms, 0))
    assert bary.batch_shape == (2,)

    def objective(mu: GMM) -> torch.Tensor:
        return sum(mw2(mu, g) for g in gmms) / 3

    start = objective(gmms[0])  # the default initialisation (equal weights: the first input)
    assert bool((objective(bary) < start - 1e-3).all())


# --------------------------------------------------------------------------------------------- bad input
@pytest.fixture(params=["host-screen", "device-summary"])
def check_mode(request, monkeypatch):
    """mw2's input checks on the host copy of small mixtures, or from a device-side summary (as for large ones)."""
    if request.param == "device-summary":
        monkeypatch.setattr(checks, "HOST_CHECK_ELEMENTS", 0)
    return request.param


def test_bad_inputs_raise_value_errors(check_mode):
    a, b = random_gmm(3, 2, seed=60), random_gmm(3, 3, seed=61)
    with pytest.raises(ValueError, match="dimension D"):
        mw2(a, b)
    heavy = GMM(a.weights * 1.5, a.means, a.covariances)
    with pytest.raises(ValueError, match="sum to 1"):
        mw2(heavy, a)
    indefinite = GMM(a.weights, a.means, a.covariances - 10 * torch.eye(2, dtype=F64))
    with pytest.raises(ValueError, match="positive definite"):
        mw2(indefinite, a)
    skew = a.covariances.clone()
    skew[:, 0, 1] += 0.5
    with pytest.raises(ValueError, match="symmetric"):
        mw2(GMM(a.weights, a.means, skew), a)
    nan_means = a.means.clone()
    nan_means[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mw2(GMM(a.weights, nan_means, a.covariances), a)
    for lams in [(-1.0, 1.0), (1.0, 0.0), (1.0, float("inf")), (1.0,)]:
        with pytest.raises(ValueError, match="unbalanced"):
            mw2(a, a, unbalanced=lams)
    with pytest.raises(ValueError, match="method"):
        gmm_ot_map(torch.zeros(4, 2, dtype=F64), a, a, method="mean")
    with pytest.raises(ValueError, match="weights"):
        gmm_barycentre([a, a], [0.5, 0.6])
    with pytest.raises(ValueError, match="share K"):
        gmm_barycentre([a, random_gmm(4, 2)])


@pytest.mark.parametrize("defect,match", [
    ("indefinite", "b.covariances must be symmetric positive definite"), ("skew", "b.covariances must be symmetric"),
    ("nan-mean", "b has NaN"), ("inf-cov", "b has NaN or inf"), ("negative-weight", "b.weights must be >= 0"),
    ("heavy", "b.weights must sum")])
def test_a_bad_second_mixture_is_named(check_mode, defect, match):
    """Every defect of ``b`` is caught, with or without gradients, and the error names ``b``."""
    a, b = random_gmm(3, 2, seed=62), random_gmm(4, 2, seed=63)
    w, m, c = b.weights.clone(), b.means.clone(), b.covariances.clone()
    if defect == "indefinite":
        c[1] = torch.diag(torch.tensor([1.0, -5.0], dtype=F64))
    elif defect == "skew":
        c[2, 0, 1] += 0.5
    elif defect == "nan-mean":
        m[3, 1] = float("nan")
    elif defect == "inf-cov":
        c[0, 1, 1] = float("inf")
    elif defect == "negative-weight":
        w = torch.tensor([0.6, 0.6, -0.3, 0.1], dtype=F64)
    else:
        w = 2 * w
    for grad in (False, True):
        means = a.means.clone().requires_grad_(grad)
        with pytest.raises(ValueError, match=match):
            mw2(GMM(a.weights, means, a.covariances), GMM(w, m, c))


def test_a_checked_call_reads_the_host_once(check_mode, monkeypatch):
    """mw2 with its input checks, forward and backward: the linear program's transfer carries the checks too."""
    from test_host_syncs import counting_host_reads

    a, b = random_gmm(4, 3, seed=64), random_gmm(5, 3, seed=65)
    means, covs = a.means.clone().requires_grad_(), b.covariances.clone().requires_grad_()
    with counting_host_reads(monkeypatch) as mode:
        mw2(GMM(a.weights, means, a.covariances), GMM(b.weights, b.means, covs)).backward()
    assert len(mode.reads) == 1, [what for what, _ in mode.reads]


# --------------------------------------------------------------------------------------------- small-problem paths
def _mw2_grads(a: GMM, b: GMM) -> tuple[torch.Tensor, ...]:
    leaves = [t.clone().requires_grad_() for t in (a.weights, a.means, a.covariances, b.means, b.covariances)]
    value = mw2(GMM(*leaves[:3]), GMM(b.weights, *leaves[3:]))
    value.sum().backward()
    return (value.detach(), *(t.grad for t in leaves))


@pytest.mark.parametrize("k0,k1", [(4, 6), (1, 3)])
def test_the_three_backward_paths_agree(monkeypatch, k0, k1):
    """Per-pair gradients from the forward pass (small problems), eigenvectors of the plan's support only, and
    all pairs in the backward pass (a support of most pairs: K0 = 1) give the same value and gradients."""
    a, b = random_gmm(k0, 3, (2,), seed=41), random_gmm(k1, 3, (2,), seed=42)
    reference = _mw2_grads(a, b)  # tiny: per-pair gradients computed in the forward pass
    monkeypatch.setattr(bures, "DENSE_BACKWARD_ELEMENTS", 0)  # support (k0 = 4) or all pairs (k0 = 1) later
    for got, ref in zip(_mw2_grads(a, b), reference):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k0,k1", [(4, 6), (1, 3)])
def test_kept_sandwiches_give_the_recomputed_gradients(monkeypatch, k0, k1):
    """The support (k0 = 4) and all-pairs (k0 = 1) backward paths from the forward's kept M_kl = Laᵀ Σb La equal those
    forming them again."""
    a, b = random_gmm(k0, 5, (2,), seed=67), random_gmm(k1, 5, (2,), seed=68)
    monkeypatch.setattr(bures, "DENSE_BACKWARD_ELEMENTS", 0)
    kept = _mw2_grads(a, b)
    monkeypatch.setattr(bures, "KEEP_SANDWICH_ELEMENTS", 0)
    for got, ref in zip(_mw2_grads(a, b), kept):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_compiled_simplex_equals_pot_emd(monkeypatch, seed):
    """The direct call of POT's compiled network simplex gives ot.emd's plan and (centred) dual potentials."""
    import imgmw.ot.discrete as discrete

    if discrete._SIMPLEX is None:
        pytest.skip("this POT's compiled solver has an unknown signature: ot.emd is used")
    rng = np.random.default_rng(seed)
    k0, k1 = rng.integers(2, 12, size=2)
    wa, wb, cost = rng.random(k0) + 0.1, rng.random(k1) + 0.1, rng.random((k0, k1))
    fast = discrete.solve_balanced(wa / wa.sum(), wb / wb.sum(), cost)
    monkeypatch.setattr(discrete, "_SIMPLEX", None)
    slow = discrete.solve_balanced(wa / wa.sum(), wb / wb.sum(), cost)
    for got, ref in zip(fast, slow):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-14)


def test_zero_weights_still_match_pot():
    """A component of zero weight takes the ot.emd route (which completes its dual potential)."""
    a, b = random_gmm(4, 3, seed=43), random_gmm(5, 3, seed=44)
    w = a.weights.clone()
    w[1] = 0.0
    a = GMM(w / w.sum(), a.means, a.covariances)
    assert abs(float(mw2(a, b)) - pot_loss(a, b)) < 1e-10


def test_unchecked_inputs_give_the_checked_value_and_gradients():
    a, b = random_gmm(5, 4, (3,), seed=45), random_gmm(6, 4, (3,), seed=46)
    means = a.means.clone().requires_grad_()
    checked = mw2(GMM(a.weights, means, a.covariances), b)
    unchecked = mw2(GMM(a.weights, means, a.covariances), b, check_input=False)
    torch.testing.assert_close(unchecked, checked, rtol=0, atol=0)
    (g_checked,) = torch.autograd.grad(checked.sum(), means)
    (g_unchecked,) = torch.autograd.grad(unchecked.sum(), means)
    torch.testing.assert_close(g_unchecked, g_checked, rtol=0, atol=0)
    with pytest.raises(ValueError, match="D"):
        mw2(a, random_gmm(2, 3, seed=47), check_input=False)  # shapes are still checked


# --------------------------------------------------------------------------------------------- discrete solvers
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # POT's L-BFGS-B call uses a deprecated SciPy option
@pytest.mark.parametrize("lams", [(1.0, 2.0), (0.3, 30.0)])
def test_public_unbalanced_solver_matches_pot(lams):
    from imgmw.ot import solve_unbalanced

    rng = np.random.default_rng(5)
    wa, wb, cost = rng.random(6) + 0.1, 2 * rng.random(4) + 0.1, rng.random((6, 4))  # masses need not match

    def objective(p):
        return float((p * cost).sum()) + lams[0] * kl(p.sum(1), wa) + lams[1] * kl(p.sum(0), wb)

    ours, ref = objective(solve_unbalanced(wa, wb, cost, lams)), objective(
        ot.unbalanced.lbfgsb_unbalanced(wa, wb, cost, 0.0, lams))
    assert ours <= ref + 1e-12 and ref - ours < 1e-6


def test_public_balanced_solver_matches_pot_at_any_mass():
    from imgmw.ot import solve_balanced

    rng = np.random.default_rng(6)
    wa, wb, cost = rng.random(5), rng.random(7), rng.random((5, 7))
    wa, wb = 3 * wa / wa.sum(), 3 * wb / wb.sum()
    plan, f, g = solve_balanced(wa, wb, cost)
    np.testing.assert_allclose(plan, ot.emd(wa, wb, cost), rtol=0, atol=1e-14)
    reduced = cost - f[:, None] - g[None, :]  # complementary slackness, up to the shift of the potentials
    shift = reduced[plan > 0]
    assert shift.max() - shift.min() < 1e-12 and reduced.min() > shift.min() - 1e-12
    assert abs(f.mean()) < 1e-14 and abs(g.mean()) < 1e-14


@pytest.mark.parametrize("args,match", [
    ((np.ones(2), np.ones(3), np.zeros((3, 2))), "shapes"),
    ((np.array([1.0, np.nan]), np.ones(2), np.zeros((2, 2))), "wa must be finite"),
    ((np.array([1.0, -1.0]), np.ones(2), np.zeros((2, 2))), "non-negative"),
    ((np.ones(2), 2 * np.ones(2), np.zeros((2, 2))), "equal masses"),
])
def test_public_solvers_reject_bad_problems(args, match):
    from imgmw.ot import solve_balanced, solve_unbalanced

    with pytest.raises(ValueError, match=match):
        solve_balanced(*args)
    if match != "equal masses":
        with pytest.raises(ValueError, match=match):
            solve_unbalanced(*args, (1.0, 1.0))


def test_a_factor_needing_jitter_is_retried_with_the_escalated_factors():
    """mw2 factorises once without a host read; a covariance that needs jitter (singular to rounding) makes the
    costs NaN on the host, and the transport is redone with GMM.cholesky's escalated factors: the value is the
    one computed from those factors directly."""
    a, b = random_gmm(3, 3, seed=50), random_gmm(4, 3, seed=51)
    v = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    singular = torch.outer(v, v)  # rank one: cholesky_ex fails, a tiny jitter repairs it
    a = GMM(a.weights, a.means, torch.cat([a.covariances[:2], singular[None]]))
    value = mw2(a, b, check_input=False)
    assert torch.isfinite(value)
    from imgmw.ot.mixture import _transport
    torch.testing.assert_close(value, _transport(a, b, a.cholesky, a.batch_shape, None, None, False)[0], rtol=0, atol=0)
    torch.testing.assert_close(mw2(a, b), value, rtol=0, atol=0)  # the checks accept it (jitter repairs it)
