"""Tests of the batched EM core (:mod:`imgmw.em`, :mod:`imgmw.init`, :mod:`imgmw.stats`).

References: scikit-learn's ``GaussianMixture`` (float64, same starting parameters), separate fits for the
batched/masked/weighted/chunked variants, the EM monotonicity theorem, and ``torch.autograd.gradcheck``
for every gradient path.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from imgmw import GMM, WarmStartEM, em_step, fit_gmm
from imgmw.init import init_gmm

F64 = torch.float64

# The E-step has two kernels (quadratic features for small D, whitened GEMMs for larger D): tests of the
# batched machinery run at one dimension of each kind.
DIMS = [2, 9]

# (N, K, D, T): a 2-D toy, a mid-size problem and patch-like D=48 data with correlated features.
PARITY_SHAPES = [(400, 3, 2, 30), (1000, 5, 6, 30), (3000, 4, 48, 10)]


def _torch(a: np.ndarray, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(a, dtype=dtype)


def _assert_same_gmm(a: GMM, b: GMM, rel: float, what: str, close_rel) -> None:
    close_rel(a.weights, b.weights, rel, f"{what} weights")
    close_rel(a.means, b.means, rel, f"{what} means")
    close_rel(a.covariances, b.covariances, rel, f"{what} covariances")


def _overlapping(n: int, seed: int, d: int = 2) -> torch.Tensor:
    """Points from two strongly overlapping clusters: EM needs many steps on them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    x[: n // 2, 0] += 1.0
    return x


# ============================================================== parity with scikit-learn
@pytest.mark.parametrize("n,k,d,t", PARITY_SHAPES)
def test_fit_gmm_matches_sklearn_float64(n, k, d, t, sklearn_fit, gmm_from_precisions, close_rel):
    x, (w, m, p), sk = sklearn_fit(n, k, d, t, seed=0)
    res = fit_gmm(_torch(x), k, n_iter=t, tol=0.0, init=gmm_from_precisions(w, m, p), reg_covar=1e-6, grad="none")
    assert int(res.n_iter) == sk.n_iter_ == t
    assert not bool(res.converged) and not sk.converged_
    assert abs(float(res.lower_bound) - sk.lower_bound_) <= 1e-10 * abs(sk.lower_bound_)
    close_rel(res.gmm.weights, sk.weights_, 1e-8, "weights")
    close_rel(res.gmm.means, sk.means_, 1e-8, "means")
    close_rel(res.gmm.covariances, sk.covariances_, 1e-8, "covariances")
    assert np.array_equal(res.log_resp.argmax(-1).numpy(), sk.predict(x))
    close_rel(res.log_resp.exp(), sk.predict_proba(x), 1e-8, "responsibilities")


# float32 error grows with the number of EM steps and the conditioning (κ(Σ) ≈ 1e5 for the D=48 data):
# after 10 steps both imgmw and scikit-learn's own float32 run drift ~1e-4 from float64, so D=48 runs
# 3 steps here (10 steps at D=48 are covered in float64 above).
@pytest.mark.parametrize("n,k,d,t", [(400, 3, 2, 30), (1000, 5, 6, 30), (3000, 4, 48, 3)])
def test_fit_gmm_float32_close_to_sklearn_float64(n, k, d, t, sklearn_fit, gmm_from_precisions, close_rel):
    x, (w, m, p), sk = sklearn_fit(n, k, d, t, seed=0)
    init = gmm_from_precisions(w, m, p, dtype=torch.float32)
    res = fit_gmm(_torch(x, torch.float32), k, n_iter=t, tol=0.0, init=init, grad="none")
    assert res.gmm.dtype == torch.float32 and res.log_resp.dtype == torch.float32
    close_rel(res.gmm.weights, sk.weights_, 1e-4, "weights")
    close_rel(res.gmm.means, sk.means_, 1e-4, "means")
    close_rel(res.gmm.covariances, sk.covariances_, 1e-4, "covariances")
    assert abs(float(res.lower_bound) - sk.lower_bound_) <= 1e-4 * abs(sk.lower_bound_)


@pytest.mark.parametrize("tol,max_iter", [(1e-3, 200), (1e-12, 4)])
def test_n_iter_and_converged_match_sklearn_with_tol(tol, max_iter, sklearn_fit, gmm_from_precisions, close_rel):
    x, (w, m, p), sk = sklearn_fit(1000, 5, 6, max_iter, seed=1, tol=tol)
    res = fit_gmm(_torch(x), 5, n_iter=max_iter, tol=tol, init=gmm_from_precisions(w, m, p), grad="none")
    assert int(res.n_iter) == sk.n_iter_
    assert bool(res.converged) == sk.converged_
    assert sk.converged_ == (sk.n_iter_ < max_iter)  # the two cases really exercise both outcomes
    assert abs(float(res.lower_bound) - sk.lower_bound_) <= 1e-10 * abs(sk.lower_bound_)
    close_rel(res.gmm.means, sk.means_, 1e-8, "means")
    close_rel(res.gmm.covariances, sk.covariances_, 1e-8, "covariances")


def test_em_step_matches_one_sklearn_iteration(sklearn_fit, gmm_from_precisions, close_rel):
    x, (w, m, p), sk = sklearn_fit(400, 3, 2, 1, seed=2)
    new = em_step(gmm_from_precisions(w, m, p), _torch(x), reg_covar=1e-6)
    _assert_same_gmm(new, GMM(*map(_torch, (sk.weights_, sk.means_, sk.covariances_))), 1e-12, "one step", close_rel)


# ============================================================== batching, masks, weights, chunks
def _stacked_problem(blobs, start_params, gmm_from_precisions, sizes, k, d):
    xs, inits = [], []
    for b, n in enumerate(sizes):
        x = blobs(n, k, d, seed=10 + b, spread=2.0)
        xs.append(_torch(x))
        inits.append(gmm_from_precisions(*start_params(x, k, seed=10 + b)))
    return xs, inits


@pytest.mark.parametrize("d", DIMS)
def test_batched_fit_equals_separate_fits(d, blobs, start_params, gmm_from_precisions, close_rel):
    xs, inits = _stacked_problem(blobs, start_params, gmm_from_precisions, [60] * 4, 3, d)
    batched = fit_gmm(torch.stack(xs), 3, n_iter=15, init=GMM.stack(inits), grad="none")
    assert batched.gmm.batch_shape == (4,) and batched.log_resp.shape == (4, 60, 3)
    for b in range(4):
        single = fit_gmm(xs[b], 3, n_iter=15, init=inits[b], grad="none")
        _assert_same_gmm(batched.gmm[b], single.gmm, 1e-10, f"instance {b}", close_rel)
        close_rel(batched.lower_bound[b], single.lower_bound, 1e-12, "lower bound")
        close_rel(batched.log_resp[b], single.log_resp, 1e-9, "log_resp")


def test_two_batch_dims_equal_flattened_batch(blobs, start_params, gmm_from_precisions, close_rel):
    xs, inits = _stacked_problem(blobs, start_params, gmm_from_precisions, [50] * 4, 2, 2)
    flat = fit_gmm(torch.stack(xs), 2, n_iter=8, init=GMM.stack(inits), grad="none")
    init4 = GMM.stack(inits)
    init22 = GMM(init4.weights.reshape(2, 2, 2), init4.means.reshape(2, 2, 2, 2),
                 init4.covariances.reshape(2, 2, 2, 2, 2))
    nested = fit_gmm(torch.stack(xs).reshape(2, 2, 50, 2), 2, n_iter=8, init=init22, grad="none")
    assert nested.lower_bound.shape == (2, 2) and nested.n_iter.shape == (2, 2)
    close_rel(nested.gmm.covariances.reshape(4, 2, 2, 2), flat.gmm.covariances, 1e-12, "covariances")
    close_rel(nested.lower_bound.reshape(4), flat.lower_bound, 1e-12, "lower bound")


@pytest.mark.parametrize("d", DIMS)
def test_masked_points_are_ignored_exactly(d, blobs, start_params, gmm_from_precisions, close_rel):
    sizes, n_max, k = [70, 41, 55], 70, 3
    xs, inits = _stacked_problem(blobs, start_params, gmm_from_precisions, sizes, k, d)
    x = torch.full((3, n_max, d), float("nan"), dtype=F64)
    x[1, 41:50] = 1e30  # garbage of every kind in the masked slots
    x[2, 55:] = -float("inf")
    mask = torch.zeros(3, n_max, dtype=torch.bool)
    for b, n in enumerate(sizes):
        x[b, :n] = xs[b]
        mask[b, :n] = True
    ragged = fit_gmm(x, k, n_iter=12, tol=1e-5, init=GMM.stack(inits), mask=mask, grad="none")
    for b, n in enumerate(sizes):
        single = fit_gmm(xs[b], k, n_iter=12, tol=1e-5, init=inits[b], grad="none")
        _assert_same_gmm(ragged.gmm[b], single.gmm, 1e-10, f"instance {b}", close_rel)
        close_rel(ragged.lower_bound[b], single.lower_bound, 1e-12, "lower bound")
        assert int(ragged.n_iter[b]) == int(single.n_iter)
        close_rel(ragged.log_resp[b, :n], single.log_resp, 1e-9, "log_resp")
    assert bool(torch.isfinite(ragged.log_resp).all())


def test_masked_fit_with_random_init_never_uses_masked_points(blobs):
    x = _torch(blobs(40, 2, 2, seed=3))
    x[:, 20:] = float("nan")
    mask = torch.zeros(40, dtype=torch.bool)
    mask[:20] = True
    for init in ("kmeans++", "kmeans", "random", "random_from_data"):
        res = fit_gmm(x, 2, n_iter=5, init=init, mask=mask, generator=torch.Generator().manual_seed(0), grad="none")
        valid = x[:20]
        assert bool(torch.isfinite(res.gmm.covariances).all()), init
        lo, hi = valid.min(0).values, valid.max(0).values  # means are convex combinations of valid points
        assert bool(((res.gmm.means >= lo - 1e-9) & (res.gmm.means <= hi + 1e-9)).all()), init


@pytest.mark.parametrize("d", DIMS)
def test_integer_sample_weights_equal_repeated_points(d, blobs, start_params, gmm_from_precisions, close_rel):
    x_np = blobs(50, 3, d, seed=4)
    init = gmm_from_precisions(*start_params(x_np, 3, seed=4))
    x = _torch(x_np)
    counts = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(1))
    counts[:3] = 1  # keep at least K points
    weighted = fit_gmm(x, 3, n_iter=10, init=init, sample_weight=counts.to(F64), grad="none")
    repeated = fit_gmm(x.repeat_interleave(counts, dim=0), 3, n_iter=10, init=init, grad="none")
    _assert_same_gmm(weighted.gmm, repeated.gmm, 1e-10, "weighted vs repeated", close_rel)
    close_rel(weighted.lower_bound, repeated.lower_bound, 1e-10, "lower bound")


def test_em_step_sample_weight_and_mask_combine(blobs, start_params, gmm_from_precisions, close_rel):
    x_np = blobs(30, 2, 3, seed=5)
    init = gmm_from_precisions(*start_params(x_np, 2, seed=5))
    x = _torch(x_np)
    sw = torch.linspace(0.5, 2.0, 30, dtype=F64)
    mask = torch.arange(30) % 3 != 0
    both = em_step(init, x, mask=mask, sample_weight=sw)
    dropped = em_step(init, x[mask], sample_weight=sw[mask])
    _assert_same_gmm(both, dropped, 1e-12, "mask × weight", close_rel)


@pytest.mark.parametrize("d", [3, 9])  # both E-step kernels
def test_public_e_step_and_m_step_compose_to_em_step(d, blobs, start_params, gmm_from_precisions, close_rel):
    """e_step -> responsibility_stats -> m_step (public names only, about any shift) is one EM step."""
    from imgmw import e_step, m_step
    from imgmw.stats import responsibility_stats

    x_np = blobs(40, 2, d, seed=7)
    init = gmm_from_precisions(*start_params(x_np, 2, seed=7))
    x = _torch(x_np)
    sw = torch.linspace(0.5, 2.0, 40, dtype=F64)
    log_resp, _ = e_step(init, x)
    composed = m_step(responsibility_stats(x, log_resp, init.means, sw), init, reg_covar=1e-6)
    _assert_same_gmm(composed, em_step(init, x, sample_weight=sw, reg_covar=1e-6), 1e-10, "composed", close_rel)


@pytest.mark.parametrize("init,d", [("kmeans", 3), ("kmeans++", 3), ("given", 3), ("given", 9)])
def test_chunked_equals_unchunked(init, d, blobs, start_params, gmm_from_precisions, close_rel):
    x_np = blobs(100, 3, d, seed=6)
    x = _torch(x_np)
    init_arg = gmm_from_precisions(*start_params(x_np, 3, seed=6)) if init == "given" else init
    sw = torch.rand(100, generator=torch.Generator().manual_seed(2), dtype=F64) + 0.5
    runs = [fit_gmm(x, 3, n_iter=10, init=init_arg, sample_weight=sw, chunk_size=cs, grad="none",
                    generator=torch.Generator().manual_seed(7)) for cs in (7, None)]
    _assert_same_gmm(runs[0].gmm, runs[1].gmm, 1e-11, "chunk 7 vs default", close_rel)
    close_rel(runs[0].log_resp, runs[1].log_resp, 1e-10, "log_resp")
    close_rel(runs[0].lower_bound, runs[1].lower_bound, 1e-13, "lower bound")


@pytest.mark.parametrize("d", DIMS)
def test_lower_bound_is_monotone_without_regularisation(d, blobs, start_params, gmm_from_precisions):
    x_np = blobs(300, 4, d, seed=7, spread=1.0)  # overlapping clusters: a long, non-trivial climb
    gmm = gmm_from_precisions(*start_params(x_np, 4, seed=7))
    x = _torch(x_np)
    values = []
    for _ in range(60):
        values.append(float(gmm.log_prob(x).mean()))
        gmm = em_step(gmm, x, reg_covar=0.0)
    values = np.array(values)
    steps = np.diff(values)
    assert (steps >= -1e-12 * np.abs(values[1:])).all(), steps.min()
    assert values[-1] - values[0] > 0.1  # the test climbed somewhere
    res = fit_gmm(x, 4, n_iter=60, init=gmm_from_precisions(*start_params(x_np, 4, seed=7)), reg_covar=0.0,
                  grad="none")
    assert abs(float(res.lower_bound) - values[-1]) <= 1e-10 * abs(values[-1])


def test_per_instance_convergence_freezes_converged_instances(blobs, close_rel):
    easy = _torch(blobs(80, 2, 2, seed=8, spread=20.0))  # well separated: converges in a few steps
    hard = _overlapping(80, seed=8)
    x = torch.stack([easy, hard])
    init = init_gmm(x, 2, "kmeans++", generator=torch.Generator().manual_seed(3))
    tol = 1e-6
    batched = fit_gmm(x, 2, n_iter=300, tol=tol, init=init, grad="none")
    n0, n1 = int(batched.n_iter[0]), int(batched.n_iter[1])
    assert bool(batched.converged.all()) and n0 + 5 < n1
    for b in range(2):
        single = fit_gmm(x[b], 2, n_iter=300, tol=tol, init=init[b], grad="none")
        assert int(single.n_iter) == int(batched.n_iter[b]) and bool(single.converged)
        _assert_same_gmm(batched.gmm[b], single.gmm, 1e-10, f"instance {b}", close_rel)
    # after instance 0 converged, its parameters stay bit-identical while instance 1 keeps moving
    early = fit_gmm(x, 2, n_iter=n0, tol=tol, init=init, grad="none")
    later = fit_gmm(x, 2, n_iter=n0 + 5, tol=tol, init=init, grad="none")
    assert bool(early.converged[0]) and not bool(early.converged[1])
    assert torch.equal(early.gmm.covariances[0], later.gmm.covariances[0])
    assert torch.equal(early.gmm.means[0], later.gmm.means[0])
    assert not torch.equal(early.gmm.means[1], later.gmm.means[1])
    assert later.n_iter.tolist() == [n0, n0 + 5]


def test_fixed_weights_keep_the_initial_weights(blobs, start_params, gmm_from_precisions):
    x_np = blobs(120, 3, 2, seed=9)
    init = gmm_from_precisions(*start_params(x_np, 3, seed=9))
    res = fit_gmm(_torch(x_np), 3, n_iter=10, init=init, fixed_weights=True, grad="none")
    assert torch.equal(res.gmm.weights, init.weights)
    uniform = fit_gmm(_torch(x_np), 3, n_iter=3, fixed_weights=True, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(uniform.gmm.weights, torch.full((3,), 1 / 3, dtype=F64), rtol=0, atol=1e-15)
    # the M-step for the means and covariances is unchanged: one step equals the free-weights step
    free = em_step(init, _torch(x_np))
    fixed = em_step(init, _torch(x_np), fixed_weights=True)
    assert torch.equal(free.means, fixed.means) and not torch.allclose(free.weights, fixed.weights)


def test_a_component_without_mass_keeps_its_parameters(blobs, start_params, gmm_from_precisions):
    x_np = blobs(60, 2, 2, seed=16)
    w, m, p = start_params(x_np, 3, seed=16)
    m[2] = 1e4  # so far away that its responsibilities underflow to exactly zero
    gmm = gmm_from_precisions(w, m, p)
    new = em_step(gmm, _torch(x_np))
    assert torch.equal(new.means[2], gmm.means[2]) and torch.equal(new.covariances[2], gmm.covariances[2])
    assert float(new.weights[2]) < 1e-14 and bool(torch.isfinite(new.log_prob(_torch(x_np))).all())
    assert not torch.equal(new.means[:2], gmm.means[:2])


# ============================================================== initialisations
@pytest.mark.parametrize("method", ["kmeans++", "kmeans", "random", "random_from_data"])
def test_init_is_seeded_and_finite(method, blobs):
    x = _torch(blobs(200, 3, 3, seed=11)).expand(2, 200, 3)
    make = lambda s: init_gmm(x, 3, method, generator=torch.Generator().manual_seed(s))  # noqa: E731
    a, b, c = make(0), make(0), make(1)
    assert torch.equal(a.means, b.means) and torch.equal(a.covariances, b.covariances)
    assert not torch.equal(a.means, c.means)
    for g in (a, c):
        assert g.batch_shape == (2,) and g.means.shape == (2, 3, 3)
        assert bool(torch.isfinite(g.means).all() and torch.isfinite(g.covariances).all())
        assert torch.allclose(g.weights.sum(-1), torch.ones(2, dtype=F64), atol=1e-12)
        assert bool((torch.linalg.cholesky_ex(g.covariances).info == 0).all())


def test_kmeans_init_recovers_separated_clusters():
    gen = torch.Generator().manual_seed(12)
    truth = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], dtype=F64)
    labels = torch.arange(800) % 4
    x = truth[labels] + 0.5 * torch.randn(800, 2, generator=gen, dtype=F64)
    for seed in range(3):
        g = init_gmm(x, 4, "kmeans", generator=torch.Generator().manual_seed(seed))
        dist = torch.cdist(g.means, truth)
        assert float(dist.min(0).values.max()) < 0.1, dist  # every true centre has a mean within 0.1
        assert torch.allclose(g.weights, torch.full((4,), 0.25, dtype=F64), atol=0.02)


def test_random_from_data_picks_distinct_valid_points():
    x = torch.arange(20, dtype=F64).reshape(10, 2)
    weight = torch.zeros(10, dtype=F64)
    weight[[2, 5, 7]] = 1.0
    g = init_gmm(x, 3, "random_from_data", sample_weight=weight, generator=torch.Generator().manual_seed(0))
    # hard assignment of the three valid points to three distinct centres: each mean is a valid point
    assert sorted(g.means[:, 0].tolist()) == [4.0, 10.0, 14.0]


# ============================================================== gradients
def _tiny_problem(seed: int = 0, n: int = 12, d: int = 2, k: int = 2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64)
    x[: n // 2] += 2.0
    logits = torch.randn(k, generator=gen, dtype=F64) * 0.3
    means = x[[0, n - 1]].clone() + 0.1
    a = torch.eye(d, dtype=F64).expand(k, d, d) + 0.2 * torch.randn(k, d, d, generator=gen, dtype=F64)
    return x, logits, means, a


def _gmm_from(logits, means, a, c: float = 0.3) -> GMM:
    """Weights softmax(logits), covariances ``A Aᵀ + c·I`` (always SPD)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    return GMM(torch.softmax(logits, -1), means, a @ a.mT + c * eye)


def _flat(g: GMM) -> tuple[torch.Tensor, ...]:
    return g.weights, g.means, g.covariances


# (N, D, reg_covar, fast_mode): exhaustive gradcheck at D=2; a random-projection gradcheck at D=9 (the
# whitened E-step kernel), regularised so that every step stays well conditioned.
GRAD_CASES = [pytest.param(12, 2, 1e-3, False, id="D2"), pytest.param(24, 9, 0.1, True, id="D9")]


@pytest.mark.parametrize("n,d,reg,fast", GRAD_CASES)
def test_gradcheck_em_step_wrt_points(n, d, reg, fast):
    x, logits, means, a = _tiny_problem(0, n, d)
    gmm = _gmm_from(logits, means, a)
    assert gradcheck(lambda x: _flat(em_step(gmm, x, reg_covar=reg)), (x.requires_grad_(),), fast_mode=fast)


@pytest.mark.parametrize("n,d,reg,fast", GRAD_CASES)
def test_gradcheck_em_step_wrt_parameters(n, d, reg, fast):
    x, logits, means, a = _tiny_problem(1, n, d)
    params = tuple(t.clone().requires_grad_() for t in (logits, means, a))
    assert gradcheck(lambda *p: _flat(em_step(_gmm_from(*p), x, reg_covar=reg)), params, fast_mode=fast)


@pytest.mark.parametrize("n,d,reg,fast", GRAD_CASES)
def test_gradcheck_em_step_with_weights_mask_and_fixed_weights(n, d, reg, fast):
    x, logits, means, a = _tiny_problem(2, n, d)
    sw = torch.linspace(0.5, 1.5, n, dtype=F64)
    mask = torch.arange(n) != 4
    gmm = _gmm_from(logits, means, a)
    out = lambda g: (g.means, g.covariances)  # noqa: E731  (the fixed weights do not depend on x)
    fn = lambda x: out(em_step(gmm, x, mask=mask, sample_weight=sw, fixed_weights=True, reg_covar=reg))  # noqa: E731
    assert gradcheck(fn, (x.requires_grad_(),), fast_mode=fast)


@pytest.mark.parametrize("n,d,reg,fast", GRAD_CASES)
def test_gradcheck_unrolled_fit_wrt_points_and_init(n, d, reg, fast):
    x, logits, means, a = _tiny_problem(3, n, d)
    gmm = _gmm_from(logits, means, a)

    def fit_x(x):
        res = fit_gmm(x, 2, n_iter=3, init=gmm, grad="unrolled", reg_covar=reg)
        return (*_flat(res.gmm), res.log_resp)

    assert gradcheck(fit_x, (x.clone().requires_grad_(),), fast_mode=fast)
    params = tuple(t.clone().requires_grad_() for t in (logits, means, a))
    fit_p = lambda *p: _flat(fit_gmm(x, 2, n_iter=3, init=_gmm_from(*p), reg_covar=reg).gmm)  # noqa: E731
    assert gradcheck(fit_p, params, fast_mode=fast)


def test_one_step_gradient_is_the_last_step_gradient():
    x0 = _overlapping(40, seed=13)  # far from converged after 4 steps: one-step and unrolled differ
    init = init_gmm(x0, 2, "random", generator=torch.Generator().manual_seed(0))
    coef = [torch.randn(s, generator=torch.Generator().manual_seed(i), dtype=F64)
            for i, s in enumerate([(2,), (2, 2), (2, 2, 2)])]
    loss = lambda g: sum((c * t).sum() for c, t in zip(coef, _flat(g)))  # noqa: E731

    x = x0.clone().requires_grad_()
    one = fit_gmm(x, 2, n_iter=4, init=init, grad="one_step")
    (g_one,) = torch.autograd.grad(loss(one.gmm), x)

    x_ref = x0.clone().requires_grad_()
    head = fit_gmm(x0, 2, n_iter=3, init=init, grad="none").gmm
    assert not head.means.requires_grad
    ref = em_step(head, x_ref)
    (g_ref,) = torch.autograd.grad(loss(ref), x_ref)
    assert torch.allclose(one.gmm.means, ref.means, rtol=0, atol=1e-13)
    assert torch.allclose(g_one, g_ref, rtol=1e-10, atol=1e-12)

    x_un = x0.clone().requires_grad_()
    (g_unrolled,) = torch.autograd.grad(loss(fit_gmm(x_un, 2, n_iter=4, init=init).gmm), x_un)
    assert not torch.allclose(g_one, g_unrolled, rtol=1e-3)  # one-step is a different (biased) gradient


def test_one_step_gradient_does_not_reach_the_init():
    x, logits, means, a = _tiny_problem(5)
    means = means.clone().requires_grad_()
    for n_iter in (1, 3):
        res = fit_gmm(x, 2, n_iter=n_iter, init=_gmm_from(logits, means, a), grad="one_step")
        assert not res.gmm.means.requires_grad  # x needs no grad and the init's graph is cut
        xg = x.clone().requires_grad_()
        res = fit_gmm(xg, 2, n_iter=n_iter, init=_gmm_from(logits, means, a), grad="one_step")
        g_init, g_x = torch.autograd.grad(res.gmm.means.sum() + res.gmm.covariances.sum(), (means, xg),
                                          allow_unused=True)
        assert g_init is None and g_x is not None
    unrolled = fit_gmm(x, 2, n_iter=3, init=_gmm_from(logits, means, a))
    (g,) = torch.autograd.grad(unrolled.gmm.means.sum(), means)
    assert bool(g.any())  # whereas the unrolled mode differentiates through the init


def test_grad_none_returns_detached_tensors(blobs):
    x = _torch(blobs(30, 2, 2, seed=14)).requires_grad_()
    res = fit_gmm(x, 2, n_iter=3, grad="none", generator=torch.Generator().manual_seed(0))
    for t in (*_flat(res.gmm), res.log_resp, res.lower_bound, res.gmm.cholesky):
        assert not t.requires_grad
    res_grad = fit_gmm(x, 2, n_iter=3, generator=torch.Generator().manual_seed(0))
    assert res_grad.gmm.means.requires_grad and res_grad.log_resp.requires_grad
    assert torch.equal(res.gmm.means, res_grad.gmm.means.detach())


def test_warm_start_em_first_call_fits_then_steps(blobs, close_rel):
    x1 = _torch(blobs(60, 3, 2, seed=15))
    x2 = x1 + 0.05 * torch.randn(60, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    em = WarmStartEM(3, fixed_weights=True, n_init_iter=4, policy=None, generator=torch.Generator().manual_seed(5))
    p1 = x1.clone().requires_grad_()
    out1 = em(p1)
    ref_fit = fit_gmm(x1, 3, n_iter=4, fixed_weights=True, grad="none", generator=torch.Generator().manual_seed(5))
    ref1 = em_step(ref_fit.gmm, x1, fixed_weights=True)
    _assert_same_gmm(out1, ref1, 1e-12, "first call", close_rel)
    state1 = em.state
    assert state1 is not None and not state1.means.requires_grad and not state1.covariances.requires_grad
    assert torch.equal(state1.means, out1.means.detach())

    p2 = x2.clone().requires_grad_()
    out2 = em(p2)
    _assert_same_gmm(out2, em_step(state1, x2, fixed_weights=True), 1e-14, "second call", close_rel)
    (out2.means.sum() + out2.covariances.sum()).backward()
    assert p2.grad is not None and float(p2.grad.abs().sum()) > 0
    assert p1.grad is None  # the stored state carries no graph back to the first call's points
    assert not em.state.means.requires_grad


def test_warm_start_em_gradcheck_of_one_call():
    x, logits, means, a = _tiny_problem(4)
    em = WarmStartEM(2, init=_gmm_from(logits, means, a), fixed_weights=False, n_init_iter=2, policy=None)
    em(x)  # initialise the state
    state = em.state

    def call(x):
        em.state = state
        return _flat(em(x))

    assert gradcheck(call, (x.clone().requires_grad_(),))


# ============================================================== bad input and degenerate data
@pytest.mark.parametrize("kwargs,match", [
    ({"reg_covar": -1e-3}, "reg_covar"),
    ({"grad": "autodiff"}, "grad"),
    ({"init": "kmeans+++"}, "init"),
    ({"n_iter": 0}, "n_iter"),
    ({"n_components": 0}, "n_components"),
    ({"tol": -1.0}, "tol"),
    ({"n_components": 11}, "n_components"),
    ({"mask": torch.ones(3, dtype=torch.bool)}, "mask"),
    ({"sample_weight": -torch.ones(10, dtype=F64)}, "sample_weight"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_fit_gmm_rejects_bad_arguments(kwargs, match):
    x = torch.randn(10, 2, dtype=F64)
    kwargs = {"n_components": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        fit_gmm(x, kwargs.pop("n_components"), **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_fit_gmm_rejects_non_finite_points(bad):
    x = torch.randn(10, 2, dtype=F64)
    x[3, 1] = bad
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        fit_gmm(x, 2)
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        em_step(GMM(torch.ones(1, dtype=F64), torch.zeros(1, 2, dtype=F64), torch.eye(2, dtype=F64)[None]), x)


def test_fit_gmm_rejects_wrong_rank_and_dtype():
    with pytest.raises(ValueError, match=r"x must have shape \[\*B, N, D\]"):
        fit_gmm(torch.randn(10, dtype=F64), 1)
    with pytest.raises(TypeError, match="floating"):
        fit_gmm(torch.arange(20).reshape(10, 2), 1)


def test_fit_gmm_rejects_masks_leaving_too_few_points():
    x = torch.randn(2, 10, 2, dtype=F64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match="mask"):
        fit_gmm(x, 2, mask=mask)
    mask[1, :1] = True
    with pytest.raises(ValueError, match="n_components"):
        fit_gmm(x, 2, mask=mask)


def test_fit_gmm_rejects_mismatched_init():
    x = torch.randn(10, 2, dtype=F64)
    g3 = GMM(torch.full((3,), 1 / 3, dtype=F64), torch.zeros(3, 2, dtype=F64), torch.eye(2, dtype=F64).expand(3, 2, 2))
    with pytest.raises(ValueError, match="components"):
        fit_gmm(x, 2, init=g3)
    with pytest.raises(ValueError, match="dtype"):
        fit_gmm(x.float(), 3, init=g3)


@pytest.mark.parametrize("reg_covar", [1e-6, 0.0])
@pytest.mark.parametrize("case", ["all_equal", "line_3d", "fewer_distinct_than_k"])
def test_degenerate_data_gives_finite_fit_or_clear_error(case, reg_covar):
    gen = torch.Generator().manual_seed(0)
    if case == "all_equal":
        x = torch.full((50, 3), 2.5, dtype=F64)
    elif case == "line_3d":
        t = torch.randn(50, 1, generator=gen, dtype=F64)
        x = t * torch.tensor([1.0, -2.0, 0.5], dtype=F64) + torch.tensor([1.0, 1.0, 1.0], dtype=F64)
    else:
        x = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64).repeat(20, 1)
    try:
        res = fit_gmm(x, 3, n_iter=20, reg_covar=reg_covar, generator=gen, grad="none")
    except ValueError as err:  # allowed only with reg_covar=0, and the message must say what to do
        assert reg_covar == 0.0 and "reg_covar" in str(err)
        return
    for t in (*_flat(res.gmm), res.log_resp, res.lower_bound, res.gmm.cholesky, res.gmm.log_prob(x)):
        assert bool(torch.isfinite(t).all())
    assert torch.allclose(res.gmm.weights.sum(), torch.ones((), dtype=F64))
