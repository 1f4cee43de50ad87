"""Optimal transport between Gaussian mixtures: MW2, unbalanced MW2, plans, maps and barycentres.

Mixture-Wasserstein distance (Delon & Desolneux 2020) between ``a = Σ_k w_k N(m_k, Σ_k)`` and
``b = Σ_l w'_l N(m'_l, Σ'_l)``:

    MW2²(a, b) = min_{P ∈ Π(w, w')} Σ_kl P_kl C_kl,   C_kl = W2²(N(m_k, Σ_k), N(m'_l, Σ'_l))

(:func:`imgmw.bures.gaussian_w2_cost`), a ``K0 × K1`` discrete OT problem solved exactly by POT's
network simplex on the host in float64 (:mod:`imgmw.ot.discrete`), one call per batch element. The unbalanced variant

    UMW2²(a, b; λa, λb) = min_{P ≥ 0} Σ_kl P_kl C_kl + λa KL(P1 | w) + λb KL(Pᵀ1 | w'),

with the generalised ``KL(p | q) = Σ p log(p/q) − p + q``, is solved by a primal–dual pair of methods
written here (POT's KL solvers, L-BFGS-B and majorisation–minimisation, stall around 1e-6 relative
accuracy at large λ, too coarse for finite-difference checks): a log-barrier interior-point method on the
dual, then Newton's method on the optimality system restricted to the support found, verified against
the optimality conditions (:mod:`imgmw.ot.discrete`).

Gradients follow the envelope theorem, in one custom autograd function (:class:`_MixtureOT`): the
value is ``Σ P·C + penalty(P)`` at the optimal plan ``P``, so ``∂/∂C = P`` with ``P`` held fixed, chained
in closed form to the means and covariances (eigenvectors only for the pairs in the support of ``P``, or, for
small problems, every pair's gradients computed with the costs and contracted with ``P`` by two GEMMs);
the weight gradient is the centred dual potentials (balanced: the gradient of an LP value on the simplex
is defined up to a constant, so each side is made to sum to zero, as POT does) or
``λ (1 − (P1)_k / w_k)`` (unbalanced: the derivative of the KL terms at the optimal plan). A single node
with a closed-form backward keeps the per-call overhead small (the ``K × K`` problems are tiny): the costs,
the weights and the input checks go to the host in one transfer, where the plans and the values are computed
(float64), and everything else stays on the input device and dtype. The gradient is first order
(``once_differentiable``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..bures import (ROUNDOFF_TOL, bures_backward, bures_barycentre, bures_forward, dense_backward,
                     flatten_batch, gaussian_w2_cost, mean_differences, w2_cost)
from ..gmm import GMM
from .checks import (check_compatible, check_gmm, check_mixture_type, check_pair, check_unbalanced, transfer_check,
                     weight_tol)
from .discrete import NonFiniteCosts, solve_batch

__all__ = ["mw2", "gmm_ot_plan", "gmm_barycentre", "barycentre_weights"]


class _Transport(NamedTuple):
    """The solution of a batch ``N`` of (un)balanced problems (see :func:`_solve`)."""

    value: Tensor  # [N]
    plan: Tensor  # [N, K0, K1]
    grad_a: Tensor  # [N, K0]: ∂value/∂wa
    grad_b: Tensor  # [N, K1]
    support: tuple[Tensor, ...] | None  # (n, k, l) indices [A] of the plans' non-zero entries
    # ∂C_kl/∂(m_k, Σa_k) [N, K0, K1, D + D²] and ∂C_kl/∂(m'_l, Σb_l) [N, K1, K0, D + D²], or None
    per_pair: tuple[Tensor, Tensor] | None
    sandwiches: Tensor | None  # M_kl = Laₖᵀ Σb_l Laₖ [N, K0, K1, D, D] kept for the backward pass, or None


def _solve(wa: Tensor, ma: Tensor, ca: Tensor, wb: Tensor, mb: Tensor, cb: Tensor, la: Tensor,
           lams: tuple[float, float] | None, *, per_pair: bool = False, support: bool = False,
           check: tuple[list[Tensor], Callable[[np.ndarray], None]] | None = None) -> _Transport:
    """Costs ``C = ‖m − m'‖² + B`` (:func:`imgmw.bures.bures_forward`), optimal plans and values of a batch.

    ``wa [N, K0]``, ``ma [N, K0, D]``, ``ca [N, K0, D, D]``, the same for ``b``; ``la [N, K0, D, D]`` with
    ``Σa = La Laᵀ``; none carries a graph. With ``per_pair`` any broadcasting batch dims may stand for ``N`` (the
    outputs then have the broadcast ones). ``per_pair``: compute every pair's cost gradients now (small problems),
    ``∂C_kl/∂m_k = 2 (m_k − m'_l) = −∂C_kl/∂m'_l`` next to the Bures gradients, each side in the layout that makes
    its contraction with the plan one GEMM; ``support``: list the plans' support for a backward pass (and keep the
    ``M_kl`` of :func:`imgmw.bures.bures_forward` if small).
    ``check = (tensors, inspect)`` (:func:`imgmw.ot.checks.transfer_check`): tensors sent to the host with the costs
    and the function that inspects their host copy before the problems are solved.
    """
    bures, grads, sandwiches = bures_forward(ca, cb, la, gradients=per_pair, keep_sandwiches=support)
    diff = mean_differences(ma, mb)
    cost = w2_cost(diff.square().sum(-1), bures)
    extra, inspect = ([], None) if check is None else check
    sol = solve_batch(cost, wa, wb, lams, support=support, extra=extra, inspect=inspect)
    pairs = None
    if grads is not None:
        pairs = (torch.cat([2.0 * diff, grads[0].flatten(-2)], -1),
                 torch.cat([(-2.0 * diff).transpose(-3, -2), grads[1].flatten(-2).transpose(-3, -2)], -1))
    return _Transport(sol.values, sol.plans, sol.grad_a, sol.grad_b, sol.support, pairs, sandwiches)


def _fold(grad: Tensor, shape: torch.Size, bshape: torch.Size, event: int) -> Tensor:
    """The gradient ``[N, *E]`` (flattened batch) or ``[*B, *E]`` of an input of ``shape = [*B', *E]`` (``*B'``
    broadcasting to ``*B = bshape``, ``len(E) = event``) as the gradient of the input: unflattened, and summed over
    the broadcast dims."""
    if grad.shape == shape:
        return grad
    return grad.reshape(*bshape, *shape[len(shape) - event:]).sum_to_size(shape)


class _MixtureOT(torch.autograd.Function):
    """Optimal value ``[*B]`` of the (un)balanced MW2 problem between two mixtures with batch shapes broadcasting to
    ``*B``.

    Inputs: ``wa [*Ba, K0]``, ``ma [*Ba, K0, D]``, ``ca [*Ba, K0, D, D]``, the same for ``b``, the detached factors
    ``la [*Ba, K0, D, D]`` (``Σa = La Laᵀ``), ``bshape = *B``, ``lams`` (``None`` or ``(λa, λb)``), ``per_pair``
    (compute the cost gradients of all pairs in the forward pass and keep them for the backward pass) and
    ``check`` (see :func:`_solve`). The batch is broadcast (``per_pair``) or flattened inside, so that autograd
    records one node.

    Backward (envelope theorem, ``P`` fixed): ``∂/∂C = P``, contracted with the kept per-pair gradients (two GEMMs),
    or chained in closed form to the means (``2 (P1 ⊙ m_k − P m')``) and covariances
    (:func:`imgmw.bures.bures_backward`: eigenvectors of the pairs in the support of ``P`` only, which the host
    solve has already listed); ``∂/∂w`` = the centred dual potentials (balanced) or ``λ (1 − P1 / w)``
    (unbalanced).
    """

    @staticmethod
    def forward(ctx, wa, ma, ca, wb, mb, cb, la, bshape, lams, per_pair, check):
        # the ctx-first form: a separate setup_context makes every apply() bind its signature (inspect), which
        # costs about as much as a 10×10 network simplex
        need = ctx.needs_input_grad
        ctx.per_pair, ctx.bshape = per_pair, bshape
        ctx.shapes = (wa.shape, ma.shape, ca.shape, wb.shape, mb.shape, cb.shape)
        if per_pair:  # batch dims broadcast through every step
            sol = _solve(wa, ma, ca, wb, mb, cb, la, lams, per_pair=True, check=check)
            ctx.save_for_backward(sol.plan, sol.grad_a, sol.grad_b, *sol.per_pair)
            return sol.value
        flat = [flatten_batch(t, bshape, e) for t, e in zip((wa, ma, ca, wb, mb, cb, la), (1, 2, 3, 1, 2, 3, 3))]
        sol = _solve(*flat, lams, support=need[2] or need[5], check=check)
        ctx.save_for_backward(sol.plan, sol.grad_a, sol.grad_b, flat[1], *flat[4:], sol.sandwiches)
        ctx.support = sol.support
        return sol.value.reshape(bshape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value):
        plan, grad_a, grad_b, *kept = ctx.saved_tensors
        if not ctx.per_pair:
            grad_value = grad_value.reshape(-1)
        g = grad_value[..., None, None] * plan  # ∂value/∂C
        need = ctx.needs_input_grad
        d_wa = grad_value[..., None] * grad_a if need[0] else None
        d_wb = grad_value[..., None] * grad_b if need[3] else None
        d_ma = d_ca = d_mb = d_cb = None
        d = ctx.shapes[1][-1]
        if ctx.per_pair:  # [N, K0, 1, K1] @ [N, K0, K1, D + D²] and the same from b's side
            if need[1] or need[2]:
                out = (g.unsqueeze(-2) @ kept[0]).squeeze(-2)
                d_ma, d_ca = out[..., :d], out[..., d:].reshape(*out.shape[:-1], d, d)
            if need[4] or need[5]:
                out = (g.mT.unsqueeze(-2) @ kept[1]).squeeze(-2)
                d_mb, d_cb = out[..., :d], out[..., d:].reshape(*out.shape[:-1], d, d)
        else:
            ma, mb, cb, la, sandwiches = kept
            d_ma = 2.0 * (g.sum(-1, keepdim=True) * ma - g @ mb) if need[1] else None
            d_mb = 2.0 * (g.sum(-2).unsqueeze(-1) * mb - g.mT @ ma) if need[4] else None
            if need[2] or need[5]:
                d_ca, d_cb = bures_backward(g, cb, la, support=ctx.support, sandwiches=sandwiches)
        grads = [None if grad is None or not needed else _fold(grad, shape, ctx.bshape, event)
                 for grad, needed, shape, event in zip((d_wa, d_ma, d_ca, d_wb, d_mb, d_cb), need, ctx.shapes,
                                                       (1, 2, 3, 1, 2, 3))]
        return (*grads, None, None, None, None, None)


def _transport(a: GMM, b: GMM, la: Tensor, bshape: torch.Size, lams: tuple[float, float] | None,
               check: tuple[list[Tensor], Callable[[np.ndarray], None]] | None,
               with_plan: bool) -> tuple[Tensor, Tensor | None]:
    """``(value [*B], plan [*B, K0, K1] or None)`` of the (un)balanced problem from ``a``'s factors ``la``.

    Through :class:`_MixtureOT` when autograd records (no plan then), else by :func:`_solve` directly.
    """
    k0, k1, d = a.n_components, b.n_components, a.n_features
    tensors = (a.weights, a.means, a.covariances, b.weights, b.means, b.covariances)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors) and not with_plan:
        # a backward pass will follow: for small problems one eigh of all pairs now beats two eigen-solves
        per_pair = (a.covariances.requires_grad or b.covariances.requires_grad) and \
            dense_backward(max(1, math.prod(bshape)) * k0 * k1, 0, d)
        return _MixtureOT.apply(*tensors, la, bshape, lams, per_pair, check), None
    wa, ma, ca, wb, mb, cb, la = (flatten_batch(t, bshape, e) for t, e in zip((*tensors, la), (1, 2, 3, 1, 2, 3, 3)))
    sol = _solve(wa, ma, ca, wb, mb, cb, la, lams, check=check)
    return sol.value.reshape(bshape), sol.plan.reshape(*bshape, k0, k1)


def _mixture_ot(a: GMM, b: GMM, lams: tuple[float, float] | None, names: tuple[str, str] | None, *,
                with_plan: bool = False) -> tuple[Tensor, Tensor | None]:
    """``(value [*B], plan [*B, K0, K1] or None)`` of the (un)balanced problem, batch shapes broadcast.

    ``names``: validate both mixtures (:func:`imgmw.ot.checks.transfer_check`, error messages naming them) on the
    host copy of the linear program's transfer; ``None``: compatibility only. ``a``'s Cholesky factors come from
    one unchecked factorisation (:meth:`GMM.factorise_unchecked`, no host read, instead of :attr:`GMM.cholesky`'s
    batched jitter ladder). A covariance it cannot factorise has NaN factors, on which the eigen-solver fails
    (CPU) or the costs turn NaN (detected by the host solve, :class:`imgmw.ot.discrete.NonFiniteCosts`), and only
    then are the mixtures checked on their own (with ``names``: invalid ones raise their ``ValueError``) and the
    transport redone with the jitter-escalated factors (or the factorisation's error raised).
    """
    if names is not None:
        check_mixture_type(a, names[0])
        check_mixture_type(b, names[1])
    bshape = check_compatible(a, b, names or ("a", "b"))
    with torch.no_grad():
        factorised, failed = a.factorise_unchecked()
        check = None if names is None else transfer_check(
            a, b, names, normalised=lams is None, a_failed=failed if factorised is not a else None)
    try:
        return _transport(a, b, factorised.cholesky.detach(), bshape, lams, check, with_plan)
    except (NonFiniteCosts, torch.linalg.LinAlgError) as err:
        if names is None and not bool(failed.any()):
            raise
        failure = err
    if names is not None:
        check_pair(a, b, names, normalised=lams is None)  # invalid inputs explain the failure
    if not bool(failed.any()):
        raise failure
    return _transport(a, b, a.check_cholesky().cholesky.detach(), bshape, lams, None, with_plan)


# --------------------------------------------------------------------------------------------- public API
def mw2(a: GMM, b: GMM, *, unbalanced: tuple[float, float] | None = None, check_input: bool = True) -> Tensor:
    """Squared Mixture-Wasserstein distance ``MW2²(a, b)`` (or its unbalanced variant): ``[*B]``.

    Args:
        a, b: mixtures with the same ``D``, dtype and device; batch shapes broadcast (``K0 ≠ K1`` is fine).
            Weights must sum to one for the balanced distance; the unbalanced one accepts any
            non-negative masses (with a positive total).
        unbalanced: ``(λa, λb)``, both finite and ``> 0``, for
            ``min_{P ≥ 0} Σ P C + λa KL(P1 | w_a) + λb KL(Pᵀ1 | w_b)``; ``None`` for the balanced distance.
        check_input: validate both mixtures (finite values, weights, SPD covariances); their summary is read on
            the host with the linear program's costs (no extra synchronisation). ``False`` skips it, for mixtures
            valid by construction (an EM fit, a checked target) in a loop.

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
    return _mixture_ot(a, b, lams, ("a", "b") if check_input else None)[0]


@torch.no_grad()
def gmm_ot_plan(a: GMM, b: GMM, *, unbalanced: tuple[float, float] | None = None) -> Tensor:
    """Optimal coupling ``P [*B, K0, K1]`` of the (un)balanced MW2 problem between ``a`` and ``b`` (no gradient)."""
    lams = check_unbalanced(unbalanced)
    plan = _mixture_ot(a, b, lams, ("a", "b"), with_plan=True)[1]
    assert plan is not None
    return plan


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
    if abs(float(lam.sum()) - 1.0) > weight_tol(lam.dtype):
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
    check_pair(bary, inputs[0], ("init", "gmms"))
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
        plans = solve_batch(cost, lifted.weights, inputs.weights, None, support=False).plans
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
