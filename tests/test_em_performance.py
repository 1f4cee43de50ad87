"""Performance contracts of the EM loop (issue 18), asserted by counting, never by timing.

- No host synchronisation per EM step with ``tol=None`` (one per step with a ``tol``): ``.item()``, ``bool()``,
  ``float()``, ``nonzero``, ``tolist()``, ``.cpu()`` … are counted by a dispatch mode and by wrapping the
  ``Tensor`` methods that do not dispatch.
- No allocation that grows with the number of points per EM step when gradients are off: the E-step's scratch
  lives in one :class:`imgmw.stats.Workspace` per fit. Storage-allocating ops and their bytes are counted by a
  dispatch mode (the profiler's memory events miss most small CPU allocations).
- The fused, in-place kernels equal an explicit float64 computation of the statistics from their definition.
- A failed Cholesky factorisation inside the sync-free loop is caught and gives exactly the checked
  (jitter-escalating) result, or its ``ValueError`` — never NaN.
"""
from __future__ import annotations

import collections
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from imgmw import GMM, fit_gmm
from imgmw import gmm as gmm_module
from imgmw import stats as stats_module
from imgmw.linalg import cholesky_jittered, cholesky_unchecked, safe_cholesky
from imgmw.mstep import em_map, m_step
from imgmw.stats import Workspace, accumulate_stats, e_step, point_features

F64 = torch.float64
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.equal.default",
            "aten.masked_select.default", "aten.is_nonzero.default", "aten.item.default"}
HOST_METHODS = ("tolist", "cpu", "numpy", "item")


class Recorder(TorchDispatchMode):
    """Counts the aten calls that synchronise with the host and the outputs whose storage is new (allocated
    by the op, as opposed to views, in-place results and ``out=`` arguments)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: collections.Counter = collections.Counter()
        self.allocs: collections.Counter = collections.Counter()
        self.alloc_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat_in = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in flat_in}
        out = func(*args, **kwargs)
        name = str(func)
        bool_index = name == "aten.index.Tensor" and any(t.dtype == torch.bool for t in flat_in[1:])
        if name in SYNC_OPS or bool_index:
            self.syncs[name] += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > 0 \
                    and t.untyped_storage().data_ptr() not in inputs:
                self.allocs[name] += 1
                self.alloc_bytes += t.untyped_storage().nbytes()
        return out


@pytest.fixture
def record(monkeypatch):
    """``record(fn) -> Recorder`` running ``fn`` under the dispatch mode, with the non-dispatching host
    transfers (``Tensor.tolist`` etc.) counted as syncs too."""

    def run(fn) -> Recorder:
        rec = Recorder()
        for method in HOST_METHODS:
            original = getattr(torch.Tensor, method)

            def counted(self, *a, _original=original, _method=method, **k):
                rec.syncs[f"Tensor.{_method}"] += 1
                return _original(self, *a, **k)

            monkeypatch.setattr(torch.Tensor, method, counted)
        try:
            with rec:
                fn()
        finally:
            monkeypatch.undo()
        return rec

    return run


def _problem(b: int, n: int, d: int, k: int, seed: int, dtype=F64, weighted: bool = False):
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(b, k, d, generator=g, dtype=F64)
    labels = torch.randint(0, k, (b, n), generator=g)
    x = torch.take_along_dim(centres, labels.unsqueeze(-1), 1) + torch.randn(b, n, d, generator=g, dtype=F64)
    w = torch.rand(b, n, generator=g, dtype=F64) + 0.5 if weighted else None
    return x.to(dtype), (None if w is None else w.to(dtype))


def _start(x: torch.Tensor, k: int) -> GMM:
    """A deterministic start: the first k points as means, the data covariance for every component."""
    b, _, d = x.shape
    xc = x - x.mean(1, keepdim=True)
    cov = xc.mT @ xc / x.shape[1] + 0.1 * torch.eye(d, dtype=x.dtype)
    return GMM(torch.full((b, k), 1.0 / k, dtype=x.dtype), x[:, :k].clone(),
               cov.unsqueeze(1).expand(b, k, d, d).clone())


# ============================================================== host synchronisation
@pytest.mark.parametrize("d", [3, 8], ids=["quad", "whitened"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weights"])
def test_fit_has_no_host_sync_per_step_without_tol(record, d, weighted):
    x, w = _problem(3, 200, d, 4, seed=1, weighted=weighted)

    def fit(n_iter):
        return lambda: fit_gmm(x, 4, n_iter=n_iter, init=_start(x, 4), grad="none", sample_weight=w, chunk_size=64)

    few, many = record(fit(2)), record(fit(7))
    assert sum(many.syncs.values()) == sum(few.syncs.values()), (few.syncs, many.syncs)
    assert sum(few.syncs.values()) <= 8  # entry checks and the one deferred Cholesky check, once per fit


@pytest.mark.parametrize("d", [3, 8], ids=["quad", "whitened"])
def test_fit_with_tol_syncs_once_per_step(record, d):
    x, _ = _problem(2, 150, d, 3, seed=2)

    def fit(n_iter):
        return lambda: fit_gmm(x, 3, n_iter=n_iter, tol=0.0, init=_start(x, 3), grad="none")  # never converges

    few, many = record(fit(2)), record(fit(7))
    assert sum(many.syncs.values()) - sum(few.syncs.values()) == 5, (few.syncs, many.syncs)


@pytest.mark.parametrize("d", [3, 8], ids=["quad", "whitened"])
def test_em_map_m_step_and_unchecked_factors_never_sync(record, d):
    x, w = _problem(2, 120, d, 3, seed=3, weighted=True)
    gmm = _start(x, 3)
    ws, features = Workspace(), point_features(x, w)

    def step():
        g, failed = gmm.factorise_unchecked()
        new, ll = em_map(g, x, w, 1e-6, False, 32, features, None, ws)
        m_step(accumulate_stats(g, x, w, 32, features, ws), g)

    assert sum(record(step).syncs.values()) == 0


def test_unrolled_fit_has_no_host_sync_per_step(record):
    x, _ = _problem(2, 60, 8, 3, seed=4)

    def fit(n_iter):
        return lambda: fit_gmm(x.clone().requires_grad_(), 3, n_iter=n_iter, init=_start(x, 3))

    assert sum(record(fit(2)).syncs.values()) == sum(record(fit(6)).syncs.values())


# ============================================================== allocations
def _per_step_allocations(x, w, chunk_size, record) -> tuple[float, float]:
    """(storage-allocating ops, bytes) of one EM step of a grad="none" fit: the difference of a 7-step and a
    2-step fit divided by 5 (the workspace, allocated in the first step, cancels out)."""

    def fit(n_iter):
        return lambda: fit_gmm(x, 4, n_iter=n_iter, init=_start(x, 4), grad="none", sample_weight=w,
                               chunk_size=chunk_size)

    few, many = record(fit(2)), record(fit(7))
    return (sum(many.allocs.values()) - sum(few.allocs.values())) / 5, (many.alloc_bytes - few.alloc_bytes) / 5


@pytest.mark.parametrize("d,dtype", [(3, torch.float32), (8, torch.float32), (8, F64)],
                         ids=["quad-f32", "whitened-f32", "whitened-f64"])
def test_em_step_allocates_nothing_that_grows_with_the_points(record, d, dtype):
    """Four times the points in four times the chunks: the same allocations per step, all parameter-sized."""
    small_x, small_w = _problem(2, 256, d, 4, seed=5, dtype=dtype, weighted=True)
    big_x, big_w = _problem(2, 1024, d, 4, seed=5, dtype=dtype, weighted=True)
    small = _per_step_allocations(small_x, small_w, 64, record)
    big = _per_step_allocations(big_x, big_w, 64, record)
    assert small == big
    # all of it parameter-sized (setup of the kernels, M-step, loop state): measured 7-15 copies of
    # B·K·(D+1)² float64 numbers
    assert small[1] < 32 * (2 * 4 * (d + 1) ** 2 * 8), small


def test_workspace_reuses_its_buffers_and_views():
    ws = Workspace()
    a = ws.take("y", (4, 5), F64, torch.device("cpu"))
    assert ws.take("y", (4, 5), F64, torch.device("cpu")) is a  # memoised view
    b = ws.take("y", (3, 2), F64, torch.device("cpu"))
    assert b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()  # a smaller chunk reuses the buffer
    c = ws.take("y", (10, 10), F64, torch.device("cpu"))
    assert c.shape == (10, 10) and c.untyped_storage().nbytes() == 800  # grown once
    assert ws.take("y", (4, 5), F64, torch.device("cpu")).untyped_storage().data_ptr() == c.untyped_storage().data_ptr()


# ============================================================== the fused kernels against the definitions
def _reference_stats(gmm: GMM, x: torch.Tensor, w: torch.Tensor | None):
    """s0, s1, s2 about the means, Σ ω log p and Σ ω in float64, straight from the definitions."""
    g = gmm.to(F64)
    x = x.to(F64)
    dist = torch.distributions.MultivariateNormal(g.means.unsqueeze(-3), g.covariances.unsqueeze(-4))
    joint = dist.log_prob(x.unsqueeze(-2)) + g.weights.log().unsqueeze(-2)  # [B, N, K]
    log_norm = torch.logsumexp(joint, -1)
    omega = torch.ones_like(log_norm) if w is None else w.to(F64)
    r = (joint - log_norm.unsqueeze(-1)).exp() * omega.unsqueeze(-1)  # [B, N, K]
    diff = x.unsqueeze(-2) - g.means.unsqueeze(-3)  # [B, N, K, D]
    s1 = (r.unsqueeze(-1) * diff).sum(-3)
    s2 = torch.einsum("bnk,bnki,bnkj->bkij", r, diff, diff)
    return r.sum(-2), s1, s2, (omega * log_norm).sum(-1), omega.sum(-1)


def _rel_err(a, b) -> float:
    return float((a.to(F64) - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("d,k", [(3, 5), (8, 4), (48, 3)], ids=["quad", "whitened-D8", "whitened-D48"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out-of-place", "in-place"])
def test_fused_statistics_equal_the_float64_definition(d, k, in_place):
    x, w = _problem(2, 300, d, k, seed=6, weighted=True)
    gmm = _start(x, k)
    ws = Workspace() if in_place else None
    for features in (None, point_features(x, w)):
        stats = accumulate_stats(gmm, x, w, chunk_size=37, features=features, workspace=ws)
        ref = _reference_stats(gmm, x, w)
        for name, got, want in zip(("s0", "s1", "s2", "log_lik", "total"),
                                   (stats.s0, stats.s1, stats.s2, stats.log_lik, stats.total), ref):
            assert _rel_err(got, want) < 1e-12, (name, _rel_err(got, want))


@pytest.mark.parametrize("d", [3, 48], ids=["quad", "whitened"])
def test_fused_float32_statistics_are_close_to_float64(d):
    x, w = _problem(1, 2000, d, 4, seed=7, weighted=True)
    gmm = _start(x, 4)
    ref = _reference_stats(gmm, x, w)
    g32, x32, w32 = gmm.to(torch.float32), x.float(), w.float()
    stats = accumulate_stats(g32, x32, w32, features=point_features(x32, w32), workspace=Workspace())
    for got, want in zip((stats.s0, stats.s1, stats.s2, stats.log_lik), ref):
        assert _rel_err(got, want) < 2e-5


def test_in_place_fit_equals_the_differentiable_fit():
    """grad="none" (workspace, in place) and grad="unrolled" (out of place) run the same formulas."""
    x, _ = _problem(2, 400, 12, 3, seed=8)
    fast = fit_gmm(x, 3, n_iter=8, init=_start(x, 3), grad="none", chunk_size=50)
    slow = fit_gmm(x.clone().requires_grad_(), 3, n_iter=8, init=_start(x, 3), chunk_size=50)
    for a, b in zip((fast.gmm.weights, fast.gmm.means, fast.gmm.covariances, fast.lower_bound),
                    (slow.gmm.weights, slow.gmm.means, slow.gmm.covariances, slow.lower_bound)):
        assert _rel_err(a, b.detach()) < 1e-12


@pytest.mark.parametrize("d,k", [(3, 3), (8, 2)], ids=["quad", "whitened"])
@pytest.mark.parametrize("elements,over_batch", [(2, True), (1, False)], ids=["batch-chunks", "point-chunks"])
def test_default_chunks_give_the_float64_definition(monkeypatch, d, k, elements, over_batch):
    """Without a chunk_size the in-place kernels split the work by whole batch elements when one fits half the
    budget of per-chunk temporaries, by points otherwise; chunks of either kind give the same statistics,
    log-likelihoods (summed once per step or per chunk) and responsibilities as the definitions, also when the
    workspace is reused."""
    b, n = 5, 40
    per_point = k if d <= stats_module.SMALL_D else k * d
    budget = elements * n * per_point  # the temporaries of `elements` batch elements
    monkeypatch.setattr(stats_module, "QUAD_CHUNK_ELEMENTS", budget)
    monkeypatch.setattr(stats_module, "WHITENED_CHUNK_ELEMENTS", budget)
    plan = stats_module._plan(b, n, per_point, budget, True, None)
    assert plan.over_batch == over_batch and plan.count > 1
    x, w = _problem(b, n, d, k, seed=15, weighted=True)
    gmm = _start(x, k)
    ws, features = Workspace(), point_features(x, w)
    for log_lik_points in (b * n, b * n - 1, b * n):  # the log-likelihood of all points at once, or per chunk
        monkeypatch.setattr(stats_module, "LOG_LIK_POINTS", log_lik_points)
        stats = accumulate_stats(gmm, x, w, features=features, workspace=ws)
        for name, got, want in zip(("s0", "s1", "s2", "log_lik", "total"),
                                   (stats.s0, stats.s1, stats.s2, stats.log_lik, stats.total),
                                   _reference_stats(gmm, x, w)):
            assert _rel_err(got, want) < 1e-12, (name, _rel_err(got, want))
    with torch.no_grad():
        fast = e_step(gmm, x, features=features, workspace=ws)
    slow = e_step(gmm, x.clone().requires_grad_())
    for a, b_ in zip(fast, slow):
        assert _rel_err(a, b_.detach()) < 1e-13


@pytest.mark.parametrize("d", [3, 8], ids=["quad", "whitened"])
@pytest.mark.parametrize("chunk_size", [None, 23])
def test_uncached_features_of_non_contiguous_points(d, chunk_size):
    """Without cached features the kernels build them chunk by chunk from views of the points, also when the
    points' batch dimensions (here [2, 3], stored transposed) do not merge into one."""
    flat, w = _problem(6, 90, d, 3, seed=16, weighted=True)
    x = flat.reshape(3, 2, 90, d).transpose(0, 1)  # [2, 3, 90, D], not contiguous
    w = w.reshape(3, 2, 90).transpose(0, 1)
    gmm = _start(flat, 3)
    gmm = GMM(*(t.reshape(3, 2, *t.shape[1:]).transpose(0, 1) for t in (gmm.weights, gmm.means, gmm.covariances)))
    ref = _reference_stats(GMM(*(t.reshape(6, *t.shape[2:]) for t in (gmm.weights, gmm.means, gmm.covariances))),
                           x.reshape(6, 90, d), w.reshape(6, 90))
    for ws in (None, Workspace()):
        stats = accumulate_stats(gmm, x, w, chunk_size=chunk_size, workspace=ws)
        for got, want in zip((stats.s0, stats.s1, stats.s2, stats.log_lik, stats.total), ref):
            assert _rel_err(got.reshape(6, *got.shape[2:]), want) < 1e-12


@pytest.mark.parametrize("d", [3, 8], ids=["quad", "whitened"])
def test_in_place_e_step_equals_the_differentiable_one(d):
    x, _ = _problem(2, 300, d, 4, seed=14)
    gmm = _start(x, 4)
    with torch.no_grad():
        fast = e_step(gmm, x, chunk_size=37, features=point_features(x), workspace=Workspace())
    slow = e_step(gmm, x.clone().requires_grad_(), chunk_size=37)
    assert slow[0].requires_grad
    for a, b in zip(fast, slow):
        assert _rel_err(a, b.detach()) < 1e-14
    dist = torch.distributions.MultivariateNormal(gmm.means.unsqueeze(-3), gmm.covariances.unsqueeze(-4))
    joint = dist.log_prob(x.unsqueeze(-2)) + gmm.weights.log().unsqueeze(-2)
    assert _rel_err(fast[1], torch.logsumexp(joint, -1)) < 1e-13
    assert _rel_err(fast[0], joint - torch.logsumexp(joint, -1, keepdim=True)) < 1e-12


def test_workspace_is_ignored_while_autograd_records():
    x, w = _problem(1, 80, 8, 3, seed=9, weighted=True)
    xg = x.clone().requires_grad_()
    gmm = _start(x, 3)
    with_ws = accumulate_stats(gmm, xg, w, chunk_size=16, workspace=Workspace())
    without = accumulate_stats(gmm, xg, w, chunk_size=16)
    assert with_ws.s2.requires_grad
    g1, = torch.autograd.grad(with_ws.s2.sum() + with_ws.s1.sum(), xg)
    g2, = torch.autograd.grad(without.s2.sum() + without.s1.sum(), xg)
    assert torch.equal(g1, g2)


# ============================================================== failed Cholesky factorisations
def test_cholesky_unchecked_flags_failures_without_sync(record):
    a = torch.eye(3, dtype=F64).repeat(4, 1, 1) * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)[:, None, None]
    a[2] = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)  # indefinite
    a[3, 1, 1] = math.nan
    out = {}
    rec = record(lambda: out.update(zip(("chol", "failed"), cholesky_unchecked(a))))
    assert sum(rec.syncs.values()) == 0
    assert out["failed"].tolist() == [False, False, True, True]
    assert out["chol"][2:].isnan().all()  # a failed factor can never pass for a number
    assert torch.equal(out["chol"][:2], safe_cholesky(a[:2]))


def _singular_problem():
    """Points on a plane in 3-D: with reg_covar=0 the covariances become singular within a few steps, so
    the unchecked factorisation fails and the fit must fall back on the checked, jitter-escalating one."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 200, 3, generator=g, dtype=F64)
    x[..., 2] = 0.5 * x[..., 0] - x[..., 1]
    return x


@pytest.mark.parametrize("tol", [None, 0.0])
def test_failed_cholesky_gives_exactly_the_checked_result(monkeypatch, tol):
    x = _singular_problem()
    n_iter = 6
    escalated = []  # GMMs factorised with jitter escalation (GMM.cholesky) during the fit
    monkeypatch.setattr(gmm_module, "cholesky_jittered", lambda a: escalated.append(a) or cholesky_jittered(a))
    got = fit_gmm(x, 2, n_iter=n_iter, tol=tol, reg_covar=0.0, init=_start(x, 2), grad="none")
    # the first step's input (the start) factorises fine: only the steps from the first failure are redone with
    # escalated factors, plus the final E-step's factorisation
    assert 1 < len(escalated) <= n_iter

    # the reference: every step factorised with escalation and checked on the host, as before issue 18
    # (GMM.cholesky's factors are safe_cholesky's bit for bit: test_cholesky_jittered_is_safe_cholesky_without_sync)
    checked = lambda self: (self.check_cholesky(), torch.zeros(self.weights.shape, dtype=torch.bool))  # noqa: E731
    monkeypatch.setattr(GMM, "factorise_unchecked", checked)
    want = fit_gmm(x, 2, n_iter=n_iter, tol=tol, reg_covar=0.0, init=_start(x, 2), grad="none")
    assert torch.isfinite(got.gmm.covariances).all() and torch.isfinite(got.lower_bound).all()
    for a, b in zip((got.gmm.means, got.gmm.covariances, got.lower_bound, got.log_resp, got.n_iter),
                    (want.gmm.means, want.gmm.covariances, want.lower_bound, want.log_resp, want.n_iter)):
        assert torch.equal(a, b)


def test_a_collapse_still_raises_the_checked_error_not_nan():
    """Ten identical points far from the rest: with reg_covar=0 their component's covariance is exactly zero
    after one step, which no relative jitter can repair."""
    x = torch.zeros(1, 20, 3, dtype=F64)
    x[0, 10:] = 100.0 + torch.randn(10, 3, generator=torch.Generator().manual_seed(11), dtype=F64)
    init = GMM(torch.full((1, 2), 0.5, dtype=F64), torch.stack([x[0, 0], x[0, 15]]).unsqueeze(0),
               torch.eye(3, dtype=F64).expand(1, 2, 3, 3).clone())
    with pytest.raises(ValueError, match="reg_covar"):
        fit_gmm(x, 2, n_iter=5, reg_covar=0.0, init=init, grad="none")


def test_unchecked_factorisation_leaves_the_callers_gmm_untouched():
    x, _ = _problem(1, 50, 3, 2, seed=12)
    gmm = _start(x, 2)
    bad = GMM(gmm.weights, gmm.means, gmm.covariances - 10.0 * torch.eye(3, dtype=F64))  # indefinite
    copy, failed = bad.factorise_unchecked()
    assert bool(failed.all()) and copy is not bad and "chol" not in bad._cache
    assert bad.cholesky.isnan().all() and bool(bad.cholesky_failed.all())  # no jitter repairs it: flagged NaN
    with pytest.raises(ValueError, match="not positive definite"):
        bad.check_cholesky()
    with pytest.raises(ValueError, match="not positive definite"):
        bad.log_prob(x[0])


def _needing_jitter(dtype):
    """SPD, singular and slightly indefinite 3×3 matrices: escalation levels 0, 1-2 and about 2 and 5."""
    g = torch.Generator().manual_seed(13)
    q = torch.linalg.qr(torch.randn(5, 3, 3, generator=g, dtype=F64))[0]
    eps = torch.finfo(dtype).eps
    lam = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 2.0], [0.0, 0.0, 3.0], [-50 * eps, 1.0, 2.0],
                        [-5e4 * eps, 1.0, 2.0]], dtype=F64)
    a = q @ torch.diag_embed(lam) @ q.mT
    return (0.5 * (a + a.mT)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cholesky_jittered_is_safe_cholesky_without_sync(record, dtype):
    a = _needing_jitter(dtype)
    out = {}
    rec = record(lambda: out.update(zip(("chol", "failed"), cholesky_jittered(a))))
    assert sum(rec.syncs.values()) == 0
    assert not bool(out["failed"].any())
    assert torch.equal(out["chol"], safe_cholesky(a))  # the same escalation, bit for bit
    ag = a.clone().requires_grad_()
    chol, _ = cholesky_jittered(ag)
    (grad,) = torch.autograd.grad((chol * torch.arange(9, dtype=dtype).view(3, 3)).sum(), ag)
    ag2 = a.clone().requires_grad_()
    (want,) = torch.autograd.grad((safe_cholesky(ag2) * torch.arange(9, dtype=dtype).view(3, 3)).sum(), ag2)
    assert torch.equal(chol, safe_cholesky(a)) and torch.equal(grad, want)  # and the same graph


def test_cholesky_jittered_flags_what_safe_cholesky_rejects():
    a = torch.eye(2, dtype=F64).repeat(3, 1, 1)
    a[1] = 0.0  # numerically zero
    a[2] = -torch.eye(2, dtype=F64)  # strongly indefinite
    chol, failed = cholesky_jittered(a)
    assert failed.tolist() == [False, True, True] and chol[1:].isnan().all()
    assert torch.equal(chol[0], torch.eye(2, dtype=F64))
    for bad, match in ((a[1:2], "reg_covar"), (a[2:], "not positive definite")):
        with pytest.raises(ValueError, match=match):
            safe_cholesky(bad)
