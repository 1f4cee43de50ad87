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
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..bures import (ROUNDOFF_TOL, batch_shape, bures_backward, bures_barycentre, bures_forward, dense_backward,
                     flatten_batch, gaussian_w2_cost, squared_mean_distances, w2_cost)
from ..gmm import GMM
from .checks import check_compatible, check_gmm, check_pair, check_unbalanced, weight_tol
from .discrete import NonFiniteCosts, solve_batch

__all__ = ["mw2", "gmm_ot_plan", "gmm_barycentre", "barycentre_weights"]


def _torch_kl(p: Tensor, q: Tensor) -> Tensor:
    """Generalised KL over the last dim, ``Σ p log(p/q) − p + q`` (``0 log 0 = 0``); returns ``[*B]``."""
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q) - p + q).sum(-1)


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
        cost = w2_cost(squared_mean_distances(ma, mb), bures)
        plan, grad_a, grad_b, support = solve_batch(cost, wa, wb, lams)
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
    """``(value [*B], plan [*B, K0, K1])`` of the (un)balanced problem, batch shapes broadcast.

    ``a``'s Cholesky factors come from one unchecked factorisation (:meth:`GMM.factorise_unchecked`, no host
    read, instead of :attr:`GMM.cholesky`'s batched jitter ladder); a covariance it cannot factorise has NaN
    factors, on which the eigen-solver fails (CPU) or the costs turn NaN (detected by the host solve,
    :class:`imgmw.ot.discrete.NonFiniteCosts`), and only then is the transport redone with the
    jitter-escalated factors (or the factorisation's error raised).
    """
    factorised, failed = a.factorise_unchecked()
    try:
        return _transport(factorised, b, lams)
    except (NonFiniteCosts, torch.linalg.LinAlgError):
        if not bool(failed.any()):
            raise
    return _transport(a.check_cholesky(), b, lams)


def _transport(a: GMM, b: GMM, lams: tuple[float, float] | None) -> tuple[Tensor, Tensor]:
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
        check_pair(a, b, normalised=lams is None)
    else:
        check_compatible(a, b)
    return _mixture_ot(a, b, lams)[0]


@torch.no_grad()
def gmm_ot_plan(a: GMM, b: GMM, *, unbalanced: tuple[float, float] | None = None) -> Tensor:
    """Optimal coupling ``P [*B, K0, K1]`` of the (un)balanced MW2 problem between ``a`` and ``b`` (no gradient)."""
    lams = check_unbalanced(unbalanced)
    check_pair(a, b, normalised=lams is None)
    return _mixture_ot(a, b, lams)[1]


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
        plans = solve_batch(cost, lifted.weights, inputs.weights, None)[0]
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
