"""The ``K0 × K1`` discrete transport problems behind mixture OT, solved on the host in float64.

- balanced: ``min_{P ∈ Π(wa, wb)} Σ P C``, exactly, by POT's network simplex, with the dual potentials
  (centred: the gradient of an LP value on the simplex is defined up to a constant);
- unbalanced: ``min_{P ≥ 0} Σ P C + λa KL(P1 | wa) + λb KL(Pᵀ1 | wb)`` with the generalised
  ``KL(p | q) = Σ p log(p/q) − p + q``, by a primal–dual pair of methods written here (POT's KL solvers,
  L-BFGS-B and majorisation–minimisation, stall around 1e-6 relative accuracy at large λ, too coarse for
  finite-difference checks): a log-barrier interior-point method on the dual, then Newton's method on the
  optimality system restricted to the support found, verified against the optimality conditions.

:func:`solve_batch` solves a batch of them with one transfer each way between the device and the host.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import ot as pot
import torch
from torch import Tensor

from .checks import check_unbalanced

__all__ = ["solve_balanced", "solve_unbalanced", "solve_batch", "Solutions", "NonFiniteCosts", "EMD_MAX_ITER"]


class NonFiniteCosts(ValueError):
    """The costs or weights of a transport problem reached the host with NaN or inf in them."""

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


def _balanced(wa: np.ndarray, wb: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, ...]:
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


def _unbalanced(wa: np.ndarray, wb: np.ndarray, cost: np.ndarray, lam_a: float, lam_b: float) -> np.ndarray:
    """Optimal plan ``[K0, K1]`` of the KL-penalised unbalanced problem (module docstring).

    Log-barrier path on the dual ``max_{f_k + g_l ≤ C_kl} −λa Σ w (e^{−f/λa} − 1) − λb Σ w' (e^{−g/λb} − 1)``
    (barrier weight ``t`` ×30 per stage; the primal plan is ``P = 1 / (t (C − f − g))``); from a duality gap
    of 1e-2 (relative to the cost scale) on, each stage tries to finish exactly by :func:`_polish` on the support
    guess of :func:`_support_guess` (on the central path ``P·(C − f − g) = 1/t``: support entries have large ``P``
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


class Solutions(NamedTuple):
    """Solutions of a batch ``*B`` of ``K0 × K1`` problems (:func:`solve_batch`), on the costs' device and dtype."""

    values: Tensor  # [*B]: optimal values, Σ P C (+ the KL terms)
    plans: Tensor  # [*B, K0, K1]
    grad_a: Tensor  # [*B, K0]: gradients of the values in wa (centred duals, or λa (1 − P1 / wa))
    grad_b: Tensor  # [*B, K1]
    support: tuple[Tensor, ...] | None  # (n, k, l): indices [A] of the non-zero entries of the plans [N, K0, K1]


def solve_batch(cost: Tensor, wa: Tensor, wb: Tensor, lams: tuple[float, float] | None, *,
                extra: Sequence[Tensor] = (), inspect: Callable[[np.ndarray], None] | None = None,
                support: bool = True) -> Solutions:
    """Optimal values, plans, weight gradients and the plans' support of a batch of problems (:class:`Solutions`).

    ``cost [*B, K0, K1]``; ``wa``, ``wb`` broadcast to ``[*B, K0]``, ``[*B, K1]``; none carries a graph. The costs
    and weights go to the host in one float64 transfer (the one host synchronisation of a call), the
    problems are solved there (one POT / interior-point call per batch element) and their values summed there
    (``Σ P C``, plus ``λa KL(P1 | wa) + λb KL(Pᵀ1 | wb)`` when unbalanced), and the results come back on
    ``cost``'s device and dtype in one transfer. The support lists the non-zero entries of the plans, found on the
    host (so the backward pass needs no synchronisation to find it); ``None`` with ``support=False``.

    ``extra`` (tensors of ``cost``'s dtype and device) ride along in the same transfer: ``inspect`` receives their
    host copies, flattened and concatenated, before anything is solved (e.g. to validate the inputs the costs
    came from, and raise).
    """
    bshape, (k0, k1) = cost.shape[:-2], cost.shape[-2:]
    n, kk = max(1, math.prod(bshape)), k0 * k1
    width = kk + k0 + k1
    host = torch.cat([cost.reshape(-1), wa.expand(*bshape, k0).reshape(-1), wb.expand(*bshape, k1).reshape(-1),
                      *(t.reshape(-1) for t in extra)]).to("cpu", torch.float64).numpy()
    if inspect is not None:
        inspect(host[n * width:])
    if not np.isfinite(host[:n * width]).all():  # e.g. a fit of non-finite points, transported without input checks
        raise NonFiniteCosts("the mixtures to transport hold NaN or inf (their costs or weights are not finite); "
                             "check the points they were fitted to")
    c_np, a_np, b_np = (host[:n * kk].reshape(n, k0, k1), host[n * kk:n * (kk + k0)].reshape(n, k0),
                        host[n * (kk + k0):n * width].reshape(n, k1))
    result = np.empty((n, width + 1))  # per row: plan, the weight gradients, the value
    plans, grad_a, grad_b = result[:, :kk].reshape(n, k0, k1), result[:, kk:kk + k0], result[:, kk + k0:width]
    for i in range(n):
        if lams is None:
            plans[i], grad_a[i], grad_b[i] = _balanced(a_np[i], b_np[i], c_np[i])
        else:
            plans[i] = _unbalanced(a_np[i], b_np[i], c_np[i], *lams)
            grad_a[i] = lams[0] * (1.0 - _safe_ratio(plans[i].sum(1), a_np[i]))
            grad_b[i] = lams[1] * (1.0 - _safe_ratio(plans[i].sum(0), b_np[i]))
    result[:, width] = (plans * c_np).sum((1, 2))
    if lams is not None:
        result[:, width] += lams[0] * _kl(plans.sum(2), a_np) + lams[1] * _kl(plans.sum(1), b_np)
    out = torch.as_tensor(result, dtype=cost.dtype, device=cost.device)
    nonzero = torch.as_tensor(np.stack(np.nonzero(plans)), device=cost.device).unbind() if support else None
    return Solutions(out[:, width].reshape(bshape), out[:, :kk].reshape(*bshape, k0, k1),
                     out[:, kk:kk + k0].reshape(*bshape, k0), out[:, kk + k0:width].reshape(*bshape, k1), nonzero)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Generalised KL over the last axis, ``Σ p log(p/q) − p + q`` (``0 log 0 = 0``)."""
    with np.errstate(divide="ignore"):  # p > 0 = q: infinite, as it should be
        ratio = np.divide(p, q, out=np.ones_like(p), where=p > 0)
    return (p * np.log(ratio) - p + q).sum(-1)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with ``0`` where ``den == 0`` (a zero-weight component receives no mass)."""
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _check_problem(wa, wb, cost, balanced: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 arrays ``wa [K0]``, ``wb [K1]``, ``cost [K0, K1]``, or ``ValueError`` naming the bad argument."""
    wa, wb, cost = (np.asarray(v, dtype=np.float64) for v in (wa, wb, cost))
    if wa.ndim != 1 or wb.ndim != 1 or cost.shape != (wa.size, wb.size) or wa.size == 0 or wb.size == 0:
        raise ValueError(f"expected weights wa [K0], wb [K1] and cost [K0, K1], got shapes {wa.shape}, {wb.shape}, "
                         f"{cost.shape}")
    for name, v in (("wa", wa), ("wb", wb), ("cost", cost)):
        if not np.isfinite(v).all():
            raise ValueError(f"{name} must be finite")
    if wa.min() < 0 or wb.min() < 0 or wa.sum() <= 0 or wb.sum() <= 0:
        raise ValueError("wa and wb must be non-negative with a positive total")
    if balanced and abs(wa.sum() - wb.sum()) > 1e-9 * max(wa.sum(), wb.sum()):
        raise ValueError(f"balanced transport needs equal masses, got {wa.sum():.12g} and {wb.sum():.12g}")
    return wa, wb, cost


def solve_balanced(wa, wb, cost) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact optimal plan of ``min_{P ∈ Π(wa, wb)} Σ P C`` and the gradients of its value with respect to the
    weights: ``(P [K0, K1], f [K0], g [K1])``, the dual potentials each shifted to mean zero (on the simplex the
    gradient is defined up to a constant; ``C − f − g`` is constant on the support of ``P`` and not smaller
    elsewhere).

    ``wa [K0]``, ``wb [K1]`` non-negative with equal totals; ``cost [K0, K1]`` finite (array-likes, float64).
    """
    wa, wb, cost = _check_problem(wa, wb, cost, True)
    plan, f, g = _balanced(wa, wb, cost)
    return plan * wa.sum(), f, g


def solve_unbalanced(wa, wb, cost, unbalanced: tuple[float, float]) -> np.ndarray:
    """Optimal plan ``P [K0, K1]`` of ``min_{P ≥ 0} Σ P C + λa KL(P1 | wa) + λb KL(Pᵀ1 | wb)``, to rounding.

    ``wa [K0]``, ``wb [K1]`` non-negative with positive totals, ``cost [K0, K1]`` finite, ``unbalanced = (λa, λb)``
    in ``imgmw.ot.LAMBDA_RANGE``. The optimality conditions are verified (see the module docstring): the result
    is the optimum to about 1e-12 where POT's ``ot.unbalanced`` solvers reach about 1e-6.
    """
    lams = check_unbalanced(unbalanced)
    if lams is None:
        raise ValueError("unbalanced must be a pair (lam_a, lam_b); use solve_balanced for balanced transport")
    return _unbalanced(*_check_problem(wa, wb, cost, False), *lams)
