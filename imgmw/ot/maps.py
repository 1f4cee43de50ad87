"""Transport maps between Gaussian mixtures (Delon & Desolneux 2020): the barycentric projection of the MW2
plan's Gaussian Monge maps and its random variant.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..bures import gaussian_monge_maps
from ..gmm import GMM
from ..stats import chunk_bounds
from .checks import check_pair
from .mixture import gmm_ot_plan

__all__ = ["gmm_ot_map", "MAP_METHODS"]

MAP_METHODS = ("bary", "rand")


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
    bshape = check_pair(source, target, ("source", "target"))
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
