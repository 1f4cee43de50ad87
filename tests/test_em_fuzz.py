"""Property-based fuzzing of :func:`imgmw.fit_gmm` on small, nasty inputs.

Contract: for any shape, scale (1e-6..1e6), duplicated or collinear points and any mask, ``fit_gmm``
either raises ``ValueError`` or returns finite parameters, lower bounds and log-responsibilities, weights
that sum to one and covariances whose Cholesky factorisation succeeds.
"""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgmw import fit_gmm

F64 = torch.float64


@st.composite
def problems(draw):
    """``(x [B, N, D], mask [B, N] | None, K, kwargs)`` with degenerate structure drawn at random."""
    b = draw(st.sampled_from([1, 2]))
    n = draw(st.integers(1, 30))
    d = draw(st.integers(1, 5))
    k = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["gaussian", "duplicated", "collinear", "few_distinct", "clusters"]))
    scale = 10.0 ** draw(st.integers(-6, 6))
    offset = 10.0 ** draw(st.integers(-6, 6)) * draw(st.sampled_from([0.0, 1.0, -1.0]))
    if kind == "gaussian":
        x = torch.randn(b, n, d, generator=gen, dtype=F64)
    elif kind == "duplicated":
        x = torch.randn(b, 1, d, generator=gen, dtype=F64).expand(b, n, d).clone()
    elif kind == "collinear":
        x = torch.randn(b, n, 1, generator=gen, dtype=F64) * torch.randn(b, 1, d, generator=gen, dtype=F64)
    elif kind == "few_distinct":
        pool = torch.randn(b, draw(st.integers(1, 3)), d, generator=gen, dtype=F64)
        x = pool[:, torch.randint(0, pool.shape[1], (n,), generator=gen)]
    else:
        centres = 5 * torch.randn(b, k, d, generator=gen, dtype=F64)
        x = centres[:, torch.randint(0, k, (n,), generator=gen)] + 0.1 * torch.randn(b, n, d, generator=gen, dtype=F64)
    x = (x * scale + offset).to(draw(st.sampled_from([torch.float64, torch.float32])))
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(b, n, generator=gen) < draw(st.floats(0.2, 1.0))
        x = torch.where(mask.unsqueeze(-1), x, torch.full_like(x, float("nan")))  # garbage where masked
    kwargs = dict(
        n_iter=draw(st.integers(1, 8)),
        tol=draw(st.sampled_from([None, 1e-3])),
        init=draw(st.sampled_from(["kmeans++", "kmeans", "random", "random_from_data"])),
        reg_covar=draw(st.sampled_from([0.0, 1e-6, 1e-3])),
        fixed_weights=draw(st.booleans()),
        chunk_size=draw(st.sampled_from([None, 3])),
        generator=torch.Generator().manual_seed(seed),
    )
    return x, mask, k, kwargs


# Derandomised (a fixed set of 40 examples) so that CI is reproducible; the same strategy was run locally
# on a few thousand random examples.
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_fit_gmm_is_finite_or_raises_value_error(problem):
    x, mask, k, kwargs = problem
    try:
        res = fit_gmm(x, k, mask=mask, grad="none", **kwargs)
    except ValueError:
        return
    g = res.gmm
    for name, t in [("weights", g.weights), ("means", g.means), ("covariances", g.covariances),
                    ("lower_bound", res.lower_bound), ("log_resp", res.log_resp)]:
        assert bool(torch.isfinite(t).all()), f"{name} is not finite"
    eps = torch.finfo(x.dtype).eps
    assert torch.allclose(g.weights.sum(-1), torch.ones((), dtype=x.dtype), rtol=0, atol=10 * eps)
    assert bool((g.weights >= 0).all())
    assert torch.equal(g.covariances, g.covariances.mT)
    chol = g.cholesky  # the package's factorisation (jitter allowed) must succeed and be finite
    assert bool(torch.isfinite(chol).all()) and bool((chol.diagonal(dim1=-2, dim2=-1) > 0).all())
    top = float(g.covariances.diagonal(dim1=-2, dim2=-1).max())
    if kwargs["reg_covar"] >= top * eps ** 0.5:
        # reg_covar bounds the condition number by ~1/√eps: plain Cholesky must succeed without jitter
        assert bool((torch.linalg.cholesky_ex(g.covariances).info == 0).all())
    assert bool(torch.isfinite(g.log_prob(torch.nan_to_num(x))).all())
    assert bool((res.n_iter >= 1).all()) and bool((res.n_iter <= kwargs["n_iter"]).all())
