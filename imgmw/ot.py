"""Optimal transport between Gaussian mixtures: MW2, unbalanced MW2, plans, maps and barycentres.

Mixture-Wasserstein distance (Delon & Desolneux 2020) between ``a = Σ_k w_k N(m_k, Σ_k)`` and
``b = Σ_l w'_l N(m'_l, Σ'_l)``:

    MW2²(a, b) = min_{P ∈ Π(w, w')} Σ_kl P_kl C_kl,   C_kl = W2²(N(m_k, Σ_k), N(m'_l, Σ'_l))

(:func:`imgmw.bures.gaussian_w2_cost`), a ``K0 × K1`` discrete OT problem solved exactly by POT's
network simplex (``ot.emd``) on CPU float64, one call per batch element. The unbalanced variant

    UMW2²(a, b; λa, λb) = min_{P ≥ 0} Σ_kl P_kl C_kl + λa KL(P1 | w) + λb KL(Pᵀ1 | w'),

with the generalised ``KL(p | q) = Σ p log(p/q) − p + q``, is solved by a primal–dual pair of methods
written here (POT's KL solvers, L-BFGS-B and majorisation–minimisation, stall around 1e-6 relative
accuracy at large λ, too coarse for finite-difference checks): a log-barrier interior-point method on the
dual, then Newton's method on the optimality system restricted to the support found, verified against
the optimality conditions (see :func:`_solve_unbalanced`).

Gradients follow the envelope theorem, in one custom autograd function (:class:`_MixtureOT`): the
value is ``Σ P·C + penalty(P)`` at the optimal plan ``P``, so ``∂/∂C = P`` with ``P`` held fixed, chained
in closed form to the means and covariances (eigenvectors only for the pairs in the support of ``P``);
the weight gradient is the centred dual potentials (balanced: the gradient of an LP value on the simplex
is defined up to a constant, so each side is made to sum to zero, as POT does) or
``λ (1 − (P1)_k / w_k)`` (unbalanced: the derivative of the KL terms at the optimal plan). A single node
with a closed-form backward keeps the per-call overhead small (the ``K × K`` problems are tiny), and
everything except the discrete solve stays on the input device and dtype. The gradient is first order
(``once_differentiable``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import ot as pot
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .bures import (ROUNDOFF_TOL, batch_shape, bures_backward, bures_barycentre, bures_forward, dense_backward,
                    flatten_batch, gaussian_monge_maps, gaussian_w2_cost)
from .gmm import GMM
from .stats import chunk_bounds

__all__ = ["mw2", "gaussian_w2_cost", "gmm_ot_plan", "gmm_ot_map", "gmm_barycentre", "barycentre_weights", "MAP_METHODS"]

MAP_METHODS = ("bary", "rand")


# --------------------------------------------------------------------------------------------- checks
def _weight_tol(dtype: torch.dtype) -> float:
    """Tolerance on ``|Σ w − 1|`` (and on covariance asymmetry): ``√eps``, at least 1e-6 (float32 data cast up)."""
    return max(1e-6, math.sqrt(torch.finfo(dtype).eps))


def _summary(g: GMM, name: str) -> Tensor:
    """Device-side summary of ``g`` for :func:`_verdict`, so that several mixtures are checked with one host
    transfer: ``[min w, min Σw, max Σw, min(Σ − Σᵀ), max(Σ − Σᵀ), min Σ, max Σ, Σ m, max Cholesky info]``."""
    if not isinstance(g, GMM):
        raise ValueError(f"{name} must be an imgmw.GMM, got {type(g).__name__}")
    if g.n_components < 1:
        raise ValueError(f"{name} must have at least one component, got K = {g.n_components}")
    with torch.no_grad():
        w, c = g.weights, g.covariances
        info = torch.linalg.cholesky_ex(c)[1].amax()
        return torch.stack([w.amin(), *torch.aminmax(w.sum(-1)), *torch.aminmax(c - c.mT), *torch.aminmax(c),
                            g.means.sum(), info.to(w.dtype)])


def _verdict(g: GMM, name: str, summary: list[float], normalised: bool) -> None:
    """Raise ``ValueError`` naming ``name`` if the host copy of :func:`_summary` shows an invalid mixture."""
    w_min, mass_min, mass_max, asym_min, asym_max, c_min, c_max, _, info = summary
    if not all(map(math.isfinite, summary)):  # a NaN/inf anywhere propagates into these reductions
        raise ValueError(f"{name} has NaN or inf in its weights, means or covariances")
    if w_min < 0:
        raise ValueError(f"{name}.weights must be >= 0, got a minimum of {w_min:.3g}")
    off = max(abs(mass_min - 1), abs(mass_max - 1))
    if normalised and off > _weight_tol(g.dtype):
        raise ValueError(f"{name}.weights must sum to 1 over the components (off by up to {off:.3g}); "
                         "normalise them, e.g. w / w.sum(-1, keepdim=True)")
    if not normalised and mass_min <= 0:
        raise ValueError(f"{name}.weights must have a positive total mass")
    asym = max(-asym_min, asym_max)
    if asym > _weight_tol(g.dtype) * max(-c_min, c_max, 1e-30):
        raise ValueError(f"{name}.covariances must be symmetric (max |Σ − Σᵀ| = {asym:.3g}); "
                         "symmetrise them with (Σ + Σᵀ)/2")
    if info == 0:
        return
    # not numerically SPD: jitter may repair round-off, never a negative eigenvalue
    c, m = g.covariances.detach(), g.means.detach()
    lam = torch.linalg.eigvalsh(c.double())
    # round-off of a covariance computed from moments (an EM fit of near-constant data, say) is relative to
    # the second moment Σ + m mᵀ of the data, which was about the previous means: at least O(1) for data
    # on the image scale. −I or diag(1, −5) are far beyond it in every dtype.
    scale = (lam.abs().amax(-1) + m.double().square().sum(-1)).clamp_min(1.0)
    if bool((lam[..., 0] < -_weight_tol(c.dtype) * scale).any()):
        raise ValueError(f"{name}.covariances must be symmetric positive definite: an eigenvalue is "
                         f"{float(lam[..., 0].min()):.3g}")
    try:
        g.cholesky
    except ValueError as err:
        raise ValueError(f"{name}.covariances must be symmetric positive definite: {err}") from None


def check_gmm(g: GMM, name: str, *, normalised: bool = True) -> GMM:
    """Validate a GMM for transport: finite values, weights ≥ 0 (summing to one if ``normalised``, else
    with a positive total), symmetric positive-definite covariances. One host synchronisation."""
    _verdict(g, name, _summary(g, name).tolist(), normalised)
    return g


def _check_pair(a: GMM, b: GMM, names: tuple[str, str] = ("a", "b"), *, normalised: bool = True) -> torch.Size:
    """:func:`check_gmm` of both mixtures (one host synchronisation), then their compatibility; returns the
    broadcast batch shape."""
    summaries = torch.stack([_summary(a, names[0]), _summary(b, names[1]).to(a.device)]).tolist()
    _verdict(a, names[0], summaries[0], normalised)
    _verdict(b, names[1], summaries[1], normalised)
    return _check_compatible(a, b, names)


def _check_compatible(a: GMM, b: GMM, names: tuple[str, str] = ("a", "b")) -> torch.Size:
    """Same ``D``, dtype and device, broadcasting batch shapes (no host synchronisation); returns the batch shape."""
    if a.n_features != b.n_features:
        raise ValueError(f"{names[0]} and {names[1]} must share the dimension D, "
                         f"got D={a.n_features} and D={b.n_features}")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"{names[0]} ({a.dtype}, {a.device}) and {names[1]} ({b.dtype}, {b.device}) "
                         "must share dtype and device")
    try:
        return batch_shape(a, b)
    except RuntimeError:
        raise ValueError(f"batch shapes {tuple(a.batch_shape)} of {names[0]} and {tuple(b.batch_shape)} of "
                         f"{names[1]} do not broadcast") from None


LAMBDA_RANGE = (1e-8, 1e8)  # KL penalties outside it overflow the solver's exp(−cost/λ)-free duals (inf at 1e300)


def check_unbalanced(unbalanced) -> tuple[float, float] | None:
    """``None`` or a pair of ``λ`` in ``LAMBDA_RANGE`` as floats; anything else raises ``ValueError``."""
    if unbalanced is None:
        return None
    try:
        lam_a, lam_b = (float(v) for v in unbalanced)
    except (TypeError, ValueError):
        raise ValueError(f"unbalanced must be None or a pair (lam_a, lam_b), got {unbalanced!r}") from None
    for lam, side in ((lam_a, "lam_a"), (lam_b, "lam_b")):
        if not (LAMBDA_RANGE[0] <= lam <= LAMBDA_RANGE[1]):
            raise ValueError(f"unbalanced {side} must lie in [{LAMBDA_RANGE[0]:g}, {LAMBDA_RANGE[1]:g}], got {lam!r} "
                             "(use unbalanced=None for the balanced distance)")
    return lam_a, lam_b


# --------------------------------------------------------------------------------------------- solvers
EMD_MAX_ITER = 100_000  # network simplex iterations (POT's default)


def _compiled_simplex() -> Callable | None:
    """POT's compiled network simplex ``emd_c`` called directly, or ``None`` if this POT's is not the known one.

    ``ot.emd`` spends about 50 µs per call in Python around a 10×10 solve that takes 6 µs (backend detection,
    input conversion, filtering of zero weights, dual centring): for the small problems of a loss that is
    most of the time. ``emd_c`` is private, and its arguments changed across POT releases (warm-start
    potentials were added), so the known signatures are probed once on a 1×1 problem.
    """
    try:
        from ot.lp.emd_wrap import emd_c
    except ImportError:
        return None
    one, zero = np.ones(1), np.zeros((1, 1))
    for extra in ((None, None), ()):
        try:
            emd_c(one, one, zero, EMD_MAX_ITER, 1, *extra)
        except TypeError:
            continue
        return lambda wa, wb, cost: emd_c(wa, wb, cost, EMD_MAX_ITER, 1, *extra)
    return None


_SIMPLEX = _compiled_simplex()


def _solve_balanced(wa: np.ndarray, wb: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, ...]:
    """Exact OT plan ``[K0, K1]`` and mean-zero dual potentials by POT's network simplex.

    With all weights positive, the compiled solver is called directly (:func:`_compiled_simplex`); zero
    weights go through ``ot.emd``, which completes the duals of the empty rows and columns.
    """
    wa, wb = wa / wa.sum(), wb / wb.sum()
    if _SIMPLEX is not None and wa.min() > 0 and wb.min() > 0:
        plan, _, u, v, code = _SIMPLEX(wa, wb, np.ascontiguousarray(cost))
        if code != 1:
            raise RuntimeError(f"ot.emd did not reach the optimum (result code {code})")
    else:
        plan, log = pot.emd(wa, wb, cost, log=True)
        if log["result_code"] != 1:
            raise RuntimeError(f"ot.emd did not reach the optimum: {log['warning']}")
        u, v = np.asarray(log["u"]), np.asarray(log["v"])
    return plan, u - u.sum() / u.size, v - v.sum() / v.size


def _barrier_centre(wa: np.ndarray, wb: np.ndarray, cost: np.ndarray, lam: np.ndarray, f: np.ndarray,
                    g: np.ndarray, t: float, max_steps: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Minimise ``t·Σ λ w (e^{−f/λ} − 1) − Σ log(C − f − g)`` over the duals ``(f, g)`` by damped Newton.

    The first sum is the negated dual objective of the unbalanced problem (both sides stacked, ``lam``
    holds ``λa`` then ``λb``), the second a log-barrier for ``f_k + g_l ≤ C_kl``. Starts from the strictly
    feasible ``(f, g)``; returns the minimiser for this ``t`` (a point of the central path).
    """
    k0 = wa.shape[0]
    w, z = np.concatenate([wa, wb]), np.concatenate([f, g])

    def phi(z: np.ndarray) -> float:
        s = cost - z[:k0, None] - z[None, k0:]
        if (s <= 0).any():
            return math.inf
        with np.errstate(over="ignore"):  # a trial step far outside: +inf, rejected by the line search
            return float(t * np.sum(lam * w * np.expm1(-z / lam)) - np.log(s).sum())

    for _ in range(max_steps):
        s = cost - z[:k0, None] - z[None, k0:]
        r, r2 = 1.0 / s, 1.0 / s**2
        e = w * np.exp(-z / lam)
        grad = -t * e + np.concatenate([r.sum(1), r.sum(0)])
        hess = np.diag(t * e / lam + np.concatenate([r2.sum(1), r2.sum(0)]))
        hess[:k0, k0:], hess[k0:, :k0] = r2, r2.T
        try:
            step = -np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:  # barrier Hessian too ill-conditioned: the point is as good as it gets
            break
        dec = -grad @ step
        if dec < 1e-9:
            break
        ds = -(step[:k0, None] + step[None, k0:])
        shrink = ds < 0
        alpha = min(1.0, 0.99 * float(np.min(-s[shrink] / ds[shrink]))) if shrink.any() else 1.0
        base = phi(z)
        while phi(z + alpha * step) > base - 0.25 * alpha * dec and alpha > 1e-12:
            alpha *= 0.5
        z = z + alpha * step
    return z[:k0], z[k0:]


def _polish(wa: np.ndarray, wb: np.ndarray, cost: np.ndarray, lam: np.ndarray, f: np.ndarray, g: np.ndarray,
            guess: np.ndarray) -> np.ndarray | None:
    """Newton on the optimality system of the unbalanced problem restricted to the support of ``guess``.

    Unknowns ``(f, g, p_S)``; equations ``f_k + g_l = C_kl`` on the support and
    ``Σ_l p_kl = w_k e^{−f_k/λa}``, ``Σ_k p_kl = w'_l e^{−g_l/λb}`` (least squares, so a support with a
    cycle is fine). Returns the plan if the result is optimal (``p ≥ 0`` and ``C − f − g ≥ 0`` to
    rounding: the KKT conditions), else ``None``.
    """
    k0, k1 = cost.shape
    rows, cols = np.nonzero(guess)
    ns = rows.size
    w = np.concatenate([wa, wb])
    z = np.concatenate([f, g, guess[rows, cols]])
    inc = np.zeros((k0 + k1, ns))  # incidence: marginal equation × support entry
    inc[rows, np.arange(ns)] = 1.0
    inc[k0 + cols, np.arange(ns)] = 1.0
    jac = np.zeros((ns + k0 + k1, k0 + k1 + ns))
    jac[:ns, :k0 + k1] = inc.T
    jac[ns:, k0 + k1:] = inc
    scale = 1.0 + np.abs(cost).max()
    best = math.inf
    for _ in range(20):
        e = w * np.exp(-z[:k0 + k1] / lam)
        res = np.concatenate([(z[rows] + z[k0 + cols] - cost[rows, cols]) / scale, inc @ z[k0 + k1:] - e])
        size = np.abs(res).max()
        if size < 1e-15 or size >= best:  # converged, or rounding-limited
            break
        best = size
        jac[ns:, :k0 + k1] = np.diag(e / lam)
        z = z - np.linalg.lstsq(jac, res * np.r_[np.full(ns, scale), np.ones(k0 + k1)], rcond=None)[0]
    f, g, p = z[:k0], z[k0:k0 + k1], z[k0 + k1:]
    reduced = cost - f[:, None] - g[None, :]
    if (not np.isfinite(z).all() or min(size, best) > 1e-10 or p.min(initial=0.0) < -1e-13
            or reduced.min() < -1e-11 * scale):
        return None
    plan = np.zeros_like(cost)
    plan[rows, cols] = np.maximum(p, 0.0)
    return plan


def _support_guess(plan: np.ndarray, slack: np.ndarray) -> np.ndarray:
    """Barrier plan restricted to its likely support: ``P > slack``, plus the tightest entry of any row or
    column left empty (every row and column carries mass at the optimum, ``μ = w e^{−f/λ} > 0``)."""
    keep = plan > slack
    keep[np.arange(plan.shape[0]), slack.argmin(1)] |= ~keep.any(1)
    keep[slack.argmin(0), np.arange(plan.shape[1])] |= ~keep.any(0)
    return np.where(keep, plan, 0.0)


def _solve_unbalanced(wa: np.ndarray, wb: np.ndarray, cost: np.ndarray, lam_a: float, lam_b: float) -> np.ndarray:
    """Optimal plan ``[K0, K1]`` of the KL-penalised unbalanced problem (module docstring).

    Log-barrier path on the dual ``max_{f_k + g_l ≤ C_kl} −λa Σ w (e^{−f/λa} − 1) − λb Σ w' (e^{−g/λb} − 1)``
    (barrier weight ``t`` ×30 per stage; the primal plan is ``P = 1 / (t (C − f − g))``); from a duality gap
    of 1e-2 (relative to the cost scale) on, each stage tries to finish exactly by :func:`_polish` on the support guess of
    :func:`_support_guess` (on the central path ``P·(C − f − g) = 1/t``: support entries have large ``P``
    and small slack). If that never verifies (e.g. when almost no mass is transported), the barrier plan
    at a duality gap of 1e-10 (relative to the cost scale) is returned. Components of zero weight receive
    no mass and are left out of the solve.
    """
    keep_a, keep_b = wa > 0, wb > 0
    a, b, c = wa[keep_a], wb[keep_b], cost[np.ix_(keep_a, keep_b)]
    k0, k1 = c.shape
    lam = np.concatenate([np.full(k0, lam_a), np.full(k1, lam_b)])
    scale = 1.0 + np.abs(c).max()
    f = np.full(k0, 0.5 * (c.min() - 1.0))
    g = np.full(k1, 0.5 * (c.min() - 1.0))
    t, plan = 1.0 / scale, None
    while plan is None:
        f, g = _barrier_centre(a, b, c, lam, f, g, t)
        gap = k0 * k1 / t
        barrier_plan = 1.0 / (t * (c - f[:, None] - g[None, :]))
        if gap < 1e-2 * scale:
            plan = _polish(a, b, c, lam, f, g, _support_guess(barrier_plan, c - f[:, None] - g[None, :]))
        if plan is None and gap < 1e-10 * scale:
            plan = barrier_plan
        t *= 30.0
    full = np.zeros_like(cost)
    full[np.ix_(keep_a, keep_b)] = plan
    return full


def _solve(cost: Tensor, wa: Tensor, wb: Tensor,
           lams: tuple[float, float] | None) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
    """Plans ``[*B, K0, K1]``, weight gradients ``[*B, K0]``, ``[*B, K1]`` and the plans' support.

    ``cost [*B, K0, K1]``; ``wa``, ``wb`` broadcast to ``[*B, K0]``, ``[*B, K1]``; none carries a graph. The costs
    and weights go to the host in one float64 transfer (the one host synchronisation of a call), the
    problems are solved there (one POT / interior-point call per batch element), and the results come back
    on ``cost``'s device and dtype in one transfer. The support is ``(n, k, l)``, index tensors ``[A]`` of the
    non-zero entries of the plans flattened to ``[N, K0, K1]``, found on the host (so the backward pass needs
    no synchronisation to find it).
    """
    bshape, (k0, k1) = cost.shape[:-2], cost.shape[-2:]
    n, kk = max(1, math.prod(bshape)), k0 * k1
    host = torch.cat([cost.reshape(n, kk), wa.expand(*bshape, k0).reshape(n, k0),
                      wb.expand(*bshape, k1).reshape(n, k1)], dim=-1).to("cpu", torch.float64).numpy()
    c_np, a_np, b_np = host[:, :kk].reshape(n, k0, k1), host[:, kk:kk + k0], host[:, kk + k0:]
    result = np.empty_like(host)  # per row: plan, then the weight gradients
    plans, grad_a, grad_b = result[:, :kk].reshape(n, k0, k1), result[:, kk:kk + k0], result[:, kk + k0:]
    for i in range(n):
        if lams is None:
            plans[i], grad_a[i], grad_b[i] = _solve_balanced(a_np[i], b_np[i], c_np[i])
        else:
            plans[i] = _solve_unbalanced(a_np[i], b_np[i], c_np[i], *lams)
            grad_a[i] = lams[0] * (1.0 - _safe_ratio(plans[i].sum(1), a_np[i]))
            grad_b[i] = lams[1] * (1.0 - _safe_ratio(plans[i].sum(0), b_np[i]))
    out = torch.as_tensor(result, dtype=cost.dtype, device=cost.device)
    support = torch.as_tensor(np.stack(np.nonzero(plans)), device=cost.device).unbind()
    return (out[:, :kk].reshape(*bshape, k0, k1), out[:, kk:kk + k0].reshape(*bshape, k0),
            out[:, kk + k0:].reshape(*bshape, k1), support)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with ``0`` where ``den == 0`` (a zero-weight component receives no mass)."""
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _torch_kl(p: Tensor, q: Tensor) -> Tensor:
    """Generalised KL over the last dim, ``Σ p log(p/q) − p + q`` (``0 log 0 = 0``); returns ``[*B]``."""
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q) - p + q).sum(-1)


def _squared_distances(ma: Tensor, mb: Tensor) -> Tensor:
    """``‖m_k − m'_l‖²`` for ``ma [..., K0, D]``, ``mb [..., K1, D]``: ``[..., K0, K1]``."""
    return (ma.unsqueeze(-2) - mb.unsqueeze(-3)).square().sum(-1)


class _MixtureOT(torch.autograd.Function):
    """Optimal value of the (un)balanced MW2 problem on a flat batch ``N``, with its plan.

    Inputs: ``wa [N, K0]``, ``ma [N, K0, D]``, ``ca [N, K0, D, D]``, the same for ``b``, the detached
    factors ``la`` (``Σa = La Laᵀ``) and ``pa = La⁻ᵀ``, ``lams`` (``None`` or ``(λa, λb)``) and ``eig_now``
    (compute the eigenvectors of all pairs in the forward pass and keep them for the backward pass).
    Outputs: ``value [N]``, and, not differentiable, the plan ``P [N, K0, K1]`` and the weight gradients.

    Backward (envelope theorem, ``P`` fixed): ``∂/∂C = P``, chained in closed form to the means
    (``2 (P1 ⊙ m_k − P m')``) and covariances (:func:`imgmw.bures.bures_backward`: the kept eigenvectors,
    or eigenvectors of the pairs in the support of ``P`` only, which the host solve has already listed);
    ``∂/∂w`` = the centred dual potentials (balanced) or ``λ (1 − P1 / w)`` (unbalanced).
    """

    @staticmethod
    def forward(ctx, wa, ma, ca, wb, mb, cb, la, pa, lams, eig_now):
        # the ctx-first form: a separate setup_context makes every apply() bind its signature (inspect), which
        # costs about as much as a 10×10 network simplex
        bures, grads = bures_forward(ca, cb, la, pa, gradients=eig_now)
        cost = (_squared_distances(ma, mb) + bures).clamp_min(0.0)
        plan, grad_a, grad_b, support = _solve(cost, wa, wb, lams)
        value = (plan * cost).sum((-2, -1))
        if lams is not None:
            value = value + lams[0] * _torch_kl(plan.sum(-1), wa) + lams[1] * _torch_kl(plan.sum(-2), wb)
        ctx.mark_non_differentiable(plan)
        ctx.save_for_backward(ma, mb, cb, la, pa, plan, grad_a, grad_b)
        ctx.grads, ctx.support = grads, support
        return value, plan

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value, _):
        ma, mb, cb, la, pa, plan, grad_a, grad_b = ctx.saved_tensors
        g = grad_value[:, None, None] * plan  # ∂value/∂C
        need = ctx.needs_input_grad
        d_ma = 2.0 * (g.sum(-1, keepdim=True) * ma - g @ mb) if need[1] else None
        d_mb = 2.0 * (g.sum(-2).unsqueeze(-1) * mb - g.mT @ ma) if need[4] else None
        d_ca, d_cb = bures_backward(g, cb, la, pa, grads=ctx.grads, support=ctx.support) \
            if need[2] or need[5] else (None, None)
        return (grad_value[:, None] * grad_a if need[0] else None, d_ma, d_ca,
                grad_value[:, None] * grad_b if need[3] else None, d_mb, d_cb, None, None, None, None)


def _mixture_ot(a: GMM, b: GMM, lams: tuple[float, float] | None) -> tuple[Tensor, Tensor]:
    """``(value [*B], plan [*B, K0, K1])`` of the (un)balanced problem, batch shapes broadcast."""
    bshape = batch_shape(a, b)
    k0, k1, d = a.n_components, b.n_components, a.n_features
    covs = (a.covariances, b.covariances)
    # a backward pass will follow: for small problems one eigh of all pairs now beats two eigen-solves
    eig_now = torch.is_grad_enabled() and any(t.requires_grad for t in covs) and \
        dense_backward(max(1, math.prod(bshape)) * k0 * k1, 0, d)
    value, plan = _MixtureOT.apply(
        flatten_batch(a.weights, bshape, 1), flatten_batch(a.means, bshape, 2),
        flatten_batch(a.covariances, bshape, 3), flatten_batch(b.weights, bshape, 1),
        flatten_batch(b.means, bshape, 2), flatten_batch(b.covariances, bshape, 3),
        flatten_batch(a.cholesky.detach(), bshape, 3), flatten_batch(a.precision_cholesky.detach(), bshape, 3),
        lams, eig_now)
    return value.reshape(bshape), plan.reshape(*bshape, k0, k1)


# --------------------------------------------------------------------------------------------- public API
def mw2(a: GMM, b: GMM, *, unbalanced: tuple[float, float] | None = None, check_input: bool = True) -> Tensor:
    """Squared Mixture-Wasserstein distance ``MW2²(a, b)`` (or its unbalanced variant): ``[*B]``.

    Args:
        a, b: mixtures with the same ``D``, dtype and device; batch shapes broadcast (``K0 ≠ K1`` is fine).
            Weights must sum to one for the balanced distance; the unbalanced one accepts any
            non-negative masses (with a positive total).
        unbalanced: ``(λa, λb)``, both finite and ``> 0``, for
            ``min_{P ≥ 0} Σ P C + λa KL(P1 | w_a) + λb KL(Pᵀ1 | w_b)``; ``None`` for the balanced distance.
        check_input: validate both mixtures (finite values, weights, SPD covariances: one host
            synchronisation). ``False`` skips it, for mixtures valid by construction (an EM fit, a checked
            target) in a loop where the host transfer of the linear program is then the only one.

    Returns:
        The optimal value per batch element, differentiable in weights, means and covariances
        (envelope theorem; see the module docstring). ``MW2 = sqrt`` of it is a distance on GMMs.

    Raises:
        ValueError: different ``D``, weights that do not sum to one, non-SPD covariances, bad ``λ``.

    Example:
        >>> a = GMM(torch.tensor([0.5, 0.5]), torch.tensor([[0.0], [4.0]]), torch.ones(2, 1, 1))
        >>> mw2(a, a)
        tensor(0.)
    """
    lams = check_unbalanced(unbalanced)
    if check_input:
        _check_pair(a, b, normalised=lams is None)
    else:
        _check_compatible(a, b)
    return _mixture_ot(a, b, lams)[0]


@torch.no_grad()
def gmm_ot_plan(a: GMM, b: GMM, *, unbalanced: tuple[float, float] | None = None) -> Tensor:
    """Optimal coupling ``P [*B, K0, K1]`` of the (un)balanced MW2 problem between ``a`` and ``b`` (no gradient)."""
    lams = check_unbalanced(unbalanced)
    _check_pair(a, b, normalised=lams is None)
    return _mixture_ot(a, b, lams)[1]


def gmm_ot_map(x: Tensor, source: GMM, target: GMM, method: str = "bary", generator: torch.Generator | None = None,
               *, plan: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
    """Delon–Desolneux transport maps of points ``x [*B, N, D]`` from ``source`` to ``target``: ``[*B, N, D]``.

    With the MW2 plan ``P`` and the affine Gaussian Monge maps ``T_kl(x) = m'_l + A_kl (x − m_k)``
    (:func:`imgmw.bures.gaussian_monge_maps`), and the source posteriors
    ``r_k(x) = w_k g_k(x) / Σ_j w_j g_j(x)`` (log domain):

    - ``"bary"``: ``T(x) = Σ_kl P_kl g_k(x) T_kl(x) / Σ_k w_k g_k(x) = Σ_k r_k(x) (m̄_k + Ā_k (x − m_k))``
      with ``Ā_k = Σ_l (P_kl / w_k) A_kl`` and ``m̄_k = Σ_l (P_kl / w_k) m'_l``: ``K0`` affine maps per point.
    - ``"rand"``: draw the pair ``(k, l)`` with probability ``P_kl g_k(x) / Σ_j w_j g_j(x) = r_k(x) P_kl / w_k``
      (``k`` from the posterior, then ``l`` from row ``k`` of the plan) and apply ``T_kl``. Uses ``generator``.

    Args:
        x: points; ``source`` / ``target``: batch shapes broadcasting with ``x``'s ``*B``.
        plan: optional precomputed ``[*B, K0, K1]`` plan (default :func:`gmm_ot_plan`).
        chunk_size: points per chunk (default: bounded ``[*B, K0, n, D]`` / ``[*B, n, D, D]`` temporaries).

    Differentiable in ``x`` (affine maps and posteriors); the mixtures and the plan are constants.
    """
    if method not in MAP_METHODS:
        raise ValueError(f"method must be one of {MAP_METHODS}, got {method!r}")
    bshape = _check_pair(source, target, ("source", "target"))
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[-1] != source.n_features:
        raise ValueError(f"x must be a tensor [*B, N, {source.n_features}], got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if x.dtype != source.dtype or x.device != source.device:
        raise ValueError(f"x ({x.dtype}, {x.device}) must share dtype and device with the GMMs")
    if x.shape[-2] < 1 or not bool(torch.isfinite(x).all()):
        raise ValueError(f"x must hold at least one point and only finite values, got shape {tuple(x.shape)}")
    source, target = source.detach(), target.detach()
    bshape = torch.broadcast_shapes(bshape, x.shape[:-2])
    if plan is not None:
        want = (source.n_components, target.n_components)
        if not isinstance(plan, Tensor) or plan.dim() < 2 or tuple(plan.shape[-2:]) != want:
            raise ValueError(f"plan must be a tensor [*B, {want[0]}, {want[1]}] (source x target components), got "
                             f"{tuple(plan.shape) if isinstance(plan, Tensor) else type(plan).__name__}")
        if not bool(torch.isfinite(plan).all()) or bool((plan < 0).any()):
            raise ValueError("plan must hold finite, non-negative masses")
        plan = plan.to(source.means)
    with torch.no_grad():
        plan = gmm_ot_plan(source, target) if plan is None else plan
        cond = plan / source.weights.unsqueeze(-1).clamp_min(torch.finfo(plan.dtype).tiny)  # row conditionals
        maps = gaussian_monge_maps(source, target)
    x = x.expand(*bshape, *x.shape[-2:])
    if method == "bary":
        lin = (cond[..., None, None] * maps).sum(-3)  # Ā_k, [*B, K0, D, D]
        shift = cond @ target.means  # m̄_k, [*B, K0, D]
        per_chunk = lambda xc: _bary_chunk(xc, source, lin, shift)  # noqa: E731
        width = source.n_components
    else:
        per_chunk = lambda xc: _rand_chunk(xc, source, target, cond, maps, generator)  # noqa: E731
        width = max(source.n_components + target.n_components, source.n_features)
    batch = max(1, math.prod(bshape))
    bounds = chunk_bounds(x.shape[-2], batch, width, source.n_features, chunk_size)
    return torch.cat([per_chunk(x[..., s:e, :]) for s, e in bounds], dim=-2)


def _posterior(x: Tensor, source: GMM) -> Tensor:
    """``r_k(x) [*B, n, K0]``: softmax of ``log w_k + log g_k(x)`` over ``k``."""
    return torch.softmax(source.component_log_prob(x), dim=-1)


def _bary_chunk(x: Tensor, source: GMM, lin: Tensor, shift: Tensor) -> Tensor:
    post = _posterior(x, source)  # [*B, n, K0]
    diff = x.unsqueeze(-3) - source.means.unsqueeze(-2)  # [*B, K0, n, D]
    mapped = diff @ lin.mT + shift.unsqueeze(-2)
    return (post.transpose(-1, -2).unsqueeze(-1) * mapped).sum(-3)


def _draw(prob: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw of indices from ``prob [..., K]`` with uniforms ``u [...]``."""
    cdf = prob.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1).contiguous(), right=True).squeeze(-1)
    return idx.clamp_max(prob.shape[-1] - 1)


def _rand_chunk(x: Tensor, source: GMM, target: GMM, cond: Tensor, maps: Tensor,
                generator: torch.Generator | None) -> Tensor:
    bshape, n = x.shape[:-2], x.shape[-2]
    with torch.no_grad():
        post = _posterior(x, source).expand(*bshape, n, source.n_components)
        u = torch.rand(*bshape, n, 2, dtype=x.dtype, device=x.device, generator=generator)
        k = _draw(post, u[..., 0])  # [*B, n]
        rows = torch.take_along_dim(cond.expand(*bshape, *cond.shape[-2:]), k.unsqueeze(-1), dim=-2)
        l = _draw(rows, u[..., 1])  # noqa: E741
    maps = maps.expand(*bshape, *maps.shape[-4:])
    k1 = maps.shape[-3]
    flat = maps.reshape(*bshape, -1, *maps.shape[-2:])  # [*B, K0·K1, D, D]
    a_sel = torch.take_along_dim(flat, (k * k1 + l)[..., None, None], dim=-3)  # [*B, n, D, D]
    m_src = torch.take_along_dim(source.means.expand(*bshape, *source.means.shape[-2:]), k.unsqueeze(-1), dim=-2)
    m_tgt = torch.take_along_dim(target.means.expand(*bshape, *target.means.shape[-2:]), l.unsqueeze(-1), dim=-2)
    return m_tgt + (a_sel @ (x - m_src).unsqueeze(-1)).squeeze(-1)


def _stack_inputs(gmms: GMM | Sequence[GMM]) -> GMM:
    if isinstance(gmms, GMM):
        if len(gmms.batch_shape) < 1:
            raise ValueError("a stacked GMM of inputs needs a leading batch dim indexing the inputs")
        return gmms
    gmms = list(gmms)
    if not gmms or not all(isinstance(g, GMM) for g in gmms):
        raise ValueError("gmms must be a non-empty list of GMMs or a stacked GMM")
    shapes = {(g.n_components, g.n_features, tuple(g.batch_shape)) for g in gmms}
    if len(shapes) != 1:
        raise ValueError(f"all input GMMs must share K, D and batch shape, got (K, D, *B) = {sorted(shapes)}")
    return GMM.stack(gmms, 0)


def barycentre_weights(weights, n_inputs: int, like: Tensor) -> Tensor:
    if weights is None:
        return torch.full((n_inputs,), 1.0 / n_inputs, dtype=like.dtype, device=like.device)
    lam = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if lam.shape != (n_inputs,) or not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()):
        raise ValueError(f"weights must be {n_inputs} finite values >= 0 (one per input), got {weights!r}")
    if abs(float(lam.sum()) - 1.0) > _weight_tol(lam.dtype):
        raise ValueError(f"weights must sum to 1, got a sum of {float(lam.sum()):.6g}")
    return lam


@torch.no_grad()
def gmm_barycentre(gmms: GMM | Sequence[GMM], weights: Sequence[float] | Tensor | None = None, *,
                   init: GMM | None = None, n_iter: int = 50, tol: float = 1e-10) -> GMM:
    """Fixed-point MW2 barycentre with ``K`` components of ``M`` mixtures with ``K`` components each.

    Minimises ``F(μ) = Σ_i λ_i MW2²(μ, ν_i)`` over ``K``-component GMMs ``μ`` whose weights are held at
    those of the initialisation, by block-coordinate descent on ``Σ_i λ_i Σ_kl P^i_kl W2²(μ_k, ν_i,l)``:

    1. plans: ``P^i`` = MW2 plan from the current ``μ`` to ``ν_i`` (each ``F`` term is then exact);
    2. components: with ``ω_k,(i,l) = λ_i P^i_kl / w_k`` (a distribution over all input components),
       ``m_k = Σ ω m_il`` and ``Σ_k`` = the Gaussian W2 barycentre of ``{Σ_il}`` with weights ``ω_k``
       (:func:`imgmw.bures.bures_barycentre`), each the exact minimiser for fixed plans.

    Each step cannot increase ``F``; iteration stops when ``F`` changes by less than ``tol·(1 + F)`` (``tol``
    at least ``ROUNDOFF_TOL × eps`` of the dtype).
    With ``K = 1`` the plans are trivial and the result is the Gaussian W2 barycentre.

    Args:
        gmms: list of ``M`` GMMs with equal ``K``, ``D`` and batch ``*B``, or one GMM with batch ``[M, *B]``.
        weights: ``λ [M]``, non-negative, summing to one (default uniform).
        init: starting barycentre (batch ``*B``); default the input with the largest ``λ_i``.
        n_iter: maximum number of plan/component rounds; tol: relative stopping tolerance.

    Returns:
        A GMM with batch ``*B`` (no gradient).
    """
    inputs = _stack_inputs(gmms)
    check_gmm(inputs, "gmms")
    lam = barycentre_weights(weights, inputs.batch_shape[0], inputs.means)
    bary = inputs[int(lam.argmax())] if init is None else init
    _check_pair(bary, inputs[0], ("init", "gmms"))
    if bool((bary.weights <= 0).any()):
        raise ValueError("the initial barycentre (init, or the input with the largest weight) must have "
                         "weights > 0: a component without mass has no matched components")
    n_in = inputs.batch_shape[0]
    means_flat = inputs.means.movedim(0, -3).flatten(-3, -2)  # [*B, M·K, D]
    covs_flat = inputs.covariances.movedim(0, -4).flatten(-4, -3)  # [*B, M·K, D, D]
    previous = math.inf
    tol = max(tol, ROUNDOFF_TOL * torch.finfo(bary.means.dtype).eps)  # see imgmw.bures.bures_barycentre
    for _ in range(n_iter):
        lifted = GMM(bary.weights.unsqueeze(0), bary.means.unsqueeze(0), bary.covariances.unsqueeze(0))
        cost = gaussian_w2_cost(lifted, inputs)  # [M, *B, K, K]
        plans = _solve(cost, lifted.weights, inputs.weights, None)[0]
        value = float((lam.view(n_in, *[1] * (plans.dim() - 1)) * plans * cost).sum())
        if abs(previous - value) <= tol * (1.0 + abs(value)):
            break
        previous = value
        omega = (lam.view(n_in, *[1] * (plans.dim() - 1)) * plans).movedim(0, -2).flatten(-2)  # [*B, K, M·K]
        omega = omega / bary.weights.unsqueeze(-1).clamp_min(torch.finfo(omega.dtype).tiny)
        means = omega @ means_flat
        covs = bures_barycentre(covs_flat.unsqueeze(-4).expand(*omega.shape, *covs_flat.shape[-2:]), omega,
                                init=bary.covariances)
        bary = GMM(bary.weights, means, covs)
    return bary
