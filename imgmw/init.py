"""Batched, seeded initialisations of Gaussian mixtures.

All methods produce a :class:`~imgmw.gmm.GMM` through the same M-step as EM, from responsibilities
that are either hard assignments to chosen centres or random:

- ``"kmeans++"``: k-means++ seeding (D² sampling, weighted by the point weights), then points are
  assigned to their nearest centre.
- ``"kmeans"``: the same seeding followed by Lloyd iterations (scikit-learn's default ``"kmeans"``).
- ``"random_from_data"``: ``K`` distinct points drawn with probability ∝ weight as centres, then hard
  assignment. (scikit-learn uses one point per component, which gives ``reg_covar·I`` covariances; the
  nearest-centre assignment gives usable covariances instead.)
- ``"random"``: responsibilities drawn uniformly at random and normalised (scikit-learn's ``"random"``).

A component that receives no point keeps its centre as mean and the data covariance.

With a ``process_group`` (:mod:`imgmw.distributed`) every rank passes its shard and all ranks get the same
start: the data moments and the assignment statistics are all-reduced, and k-means++ draws each centre from
the concatenated data (:func:`kmeans_plus_plus`). ``"random"`` and ``"random_from_data"`` draw per point and
are not offered there.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .deprecation import renamed_parameters
from .distributed import all_gather_stack, all_reduce_sum, broadcast_from_first, check_process_group, rank, reduce_stats
from .gmm import GMM
from .linalg import add_to_diagonal, symmetrize
from .mstep import m_step
from .stats import (SMALL_D, QuadFeatures, SuffStats, WhitenedFeatures, Workspace, chunk_bounds,
                    quad_point_features, quad_stats_about, stats_from_resp)

__all__ = ["INIT_METHODS", "COLLECTIVE_INIT_METHODS", "init_gmm", "kmeans_plus_plus", "data_moments"]

INIT_METHODS = ("kmeans++", "kmeans", "random", "random_from_data")
COLLECTIVE_INIT_METHODS = ("kmeans++", "kmeans")  # the string inits offered with a process group


def _weights_or_ones(x: Tensor, weight: Tensor | None) -> Tensor:
    return torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device) if weight is None else weight


@renamed_parameters(weight="sample_weight")
def data_moments(x: Tensor, sample_weight: Tensor | None, process_group=None) -> tuple[Tensor, Tensor]:
    """Weighted mean ``[*B, D]`` and covariance ``[*B, D, D]`` of ``x [*B, N, D]`` (of all ranks' points
    with a ``process_group``). The centred points are formed chunk by chunk (:func:`imgmw.stats.chunk_bounds`),
    so the temporaries stay small whatever ``N``."""
    process_group = check_process_group(process_group)
    w = _weights_or_ones(x, sample_weight)
    w = w / all_reduce_sum(w.sum(-1, keepdim=True), process_group)
    mean = all_reduce_sum((w.unsqueeze(-2) @ x).squeeze(-2), process_group)
    cov = x.new_zeros(*x.shape[:-2], x.shape[-1], x.shape[-1])
    for lo, hi in chunk_bounds(x.shape[-2], math.prod(x.shape[:-2]), 1, x.shape[-1], None):
        xc = x[..., lo:hi, :] - mean.unsqueeze(-2)
        cov = cov + (xc * w[..., lo:hi].unsqueeze(-1)).mT @ xc
    return mean, symmetrize(all_reduce_sum(cov, process_group))


def _squared_distances(x: Tensor, c: Tensor) -> Tensor:
    """``‖x_n − c‖² [*B, N]`` for ``x [*B, N, D]`` and ``c [*B, 1, D]``, chunked over ``N``."""
    out = x.new_empty(x.shape[:-1])
    for lo, hi in chunk_bounds(x.shape[-2], math.prod(x.shape[:-2]), 1, x.shape[-1], None):
        out[..., lo:hi] = (x[..., lo:hi, :] - c).square().sum(-1)
    return out


def _sample_rows(p: Tensor, n: int, generator: torch.Generator | None, replacement: bool) -> Tensor:
    """Indices ``[*B, n]`` drawn from unnormalised probabilities ``p [*B, N]``; zero-probability entries are never
    drawn.

    With replacement: inverse-CDF sampling (``searchsorted`` of uniform draws in the running sums), an
    order of magnitude faster than ``torch.multinomial`` on wide rows. Without replacement: the ``n`` largest
    keys ``p_i / q_i`` with ``q_i ~ Exp(1)`` drawn as ``−log u_i`` (the exponential race, which draws
    successively ∝ ``p`` among the rest: ``torch.multinomial``'s algorithm, whose ``exponential_`` took several
    times longer than ``rand`` and ``log`` on ``[32, 2048]``).
    """
    if not replacement:
        q = torch.rand(p.shape, dtype=torch.float64, device=p.device, generator=generator).log_().neg_()
        return torch.topk(p / q, n, dim=-1).indices
    cdf = p.double().cumsum(-1)
    u = torch.rand(*p.shape[:-1], n, dtype=torch.float64, device=p.device, generator=generator)
    idx = torch.searchsorted(cdf, u * cdf[..., -1:], right=True)
    return idx.clamp_max(p.shape[-1] - 1)


def _gather_points(x: Tensor, idx: Tensor) -> Tensor:
    """``x [*B, N, D]`` at ``idx [*B, k]`` → ``[*B, k, D]``."""
    return torch.take_along_dim(x, idx.unsqueeze(-1), dim=-2)


def _draw_shared(p: Tensor, generator: torch.Generator | None, process_group) -> Tensor:
    """One point per batch element drawn ∝ ``p [*B, N]`` from the points ``x`` of ALL ranks: returns the
    indicator ``[*B, N]`` of the drawn local point (all false on the other ranks).

    One uniform ``u [*B]`` (rank 0's draw, broadcast) selects, by inverse CDF over the ranks' sums in rank
    order, the rank that owns the point and then the point within it: the same draw as inverse-CDF sampling
    over the concatenated shards, so one process and several give the same centres from the same generator.
    """
    cdf = p.double().cumsum(-1)
    u = torch.rand(p.shape[:-1], dtype=torch.float64, device=p.device, generator=generator)
    u = broadcast_from_first(u, process_group)
    totals = all_gather_stack(cdf[..., -1], process_group)  # [W, *B]
    ends = totals.cumsum(0)
    target = u * ends[-1]
    last = (totals > 0).long().cumsum(0).argmax(0)  # last rank with positive mass (ranks agree)
    owner = torch.minimum((ends <= target).sum(0), last)
    here = rank(process_group)
    local = target - (ends[here] - totals[here])
    idx = torch.searchsorted(cdf, local.unsqueeze(-1), right=True).clamp_max(p.shape[-1] - 1)
    hit = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
    hit.scatter_(-1, idx, True)
    return hit & (owner == here).unsqueeze(-1)


@renamed_parameters(weight="sample_weight")
def kmeans_plus_plus(x: Tensor, n_components: int, sample_weight: Tensor | None = None,
                     generator: torch.Generator | None = None, process_group=None) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007), batched: centres ``[*B, K, D]``.

    The first centre is drawn ∝ ``ω_n``; each next one ∝ ``ω_n · min_j ‖x_n − c_j‖²``. When all
    weighted distances vanish (duplicated data) the draw falls back to ∝ ``ω_n``. With a ``process_group``
    the draws run over the points of all ranks (:func:`_draw_shared`, three small collectives per centre)
    and every rank returns the same centres.
    """
    process_group = check_process_group(process_group)
    w = _weights_or_ones(x, sample_weight)
    centres = []
    min_d2 = None
    for _ in range(n_components):
        if min_d2 is None:
            p = w
        else:
            p = w * min_d2
            dead = all_reduce_sum(p.sum(-1, keepdim=True), process_group) <= 0
            p = torch.where(dead, w, p)
        if process_group is None:
            c = _gather_points(x, _sample_rows(p, 1, generator, True))
        else:
            hit = _draw_shared(p, generator, process_group)
            c = all_reduce_sum((hit.to(x.dtype).unsqueeze(-2) @ x), process_group)
        centres.append(c)
        d2 = _squared_distances(x, c)
        min_d2 = d2 if min_d2 is None else torch.minimum(min_d2, d2)
    return torch.cat(centres, dim=-2)


def _nearest(dist: Tensor, ramp: Tensor) -> tuple[Tensor, Tensor]:
    """The nearest centre of each point from squared distances up to a per-point constant, ``dist [*B, K, n]``
    (centres × points, so that the minimum over centres runs along contiguous rows), overwritten by the
    one-hot rows: ``(one_hot [*B, K, n] in dist's dtype, first [*B, 1, n])`` with ``K − first`` the index of the
    centre.

    Ties go to the first of the equally near centres, as with ``argmin``: the minima get the keys ``ramp [K, 1] =
    (K, K−1, …, 1)``, the others 0, and the one-hot row marks the largest key. All of it is in-place arithmetic
    on floats: ``argmin`` over a dimension of 10, comparisons (boolean results), conversions of booleans and
    fresh ``[*B, K, n]`` results (first touches of new memory) ran five to twenty times slower on these shapes."""
    gap = dist.sub_(dist.amin(-2, keepdim=True)).sign_()  # 0 at the minima, 1 elsewhere
    key = torch.addcmul(ramp, gap, ramp, value=-1.0, out=gap)
    first = key.amax(-2, keepdim=True)
    return key.sub_(first - 1.0).clamp_min_(0.0), first


def _hard_stats(x: Tensor, weight: Tensor | None, centres: Tensor, chunk_size: int | None, process_group=None,
                features: QuadFeatures | None = None) -> SuffStats:
    """Statistics of the nearest-centre assignment, shifted by the centres (chunked over points).

    Summed over the ranks of ``process_group``. The assignment (:func:`_nearest`) is written as weighted one-hot
    rows ``[*B, K, n]``. For ``D ≤ SMALL_D`` the squared distances (``‖c̃‖² − 2c̃·x̃`` about the features' origin)
    and the statistics are float64 GEMMs with the quadratic features (the fit's cached ones when given), as in
    the E-step; otherwise the distances are ``‖c‖² − 2c·x`` and every point is centred on its own centre for the
    statistics. Neither carries cancellation.
    """
    k, d = centres.shape[-2], centres.shape[-1]
    quad = d <= SMALL_D
    p = d * (d + 1) // 2  # the products among the quadratic features, before x̃ and 1
    origin = centres.mean(-2) if features is None else features.centre  # expansion point of the features
    if quad:
        ct = centres.double() - origin.double().unsqueeze(-2)
        w_dist = torch.cat([-2.0 * ct, ct.square().sum(-1, keepdim=True)], dim=-1)  # [*B, K, D+1]
    else:
        minus_2c, c_sq = -2.0 * centres, centres.square().sum(-1, keepdim=True)
    dtype = torch.float64 if quad else x.dtype
    ramp = torch.arange(k, 0, -1, dtype=dtype, device=x.device).unsqueeze(-1)
    ws = Workspace()  # the distances, overwritten by the one-hot rows, for every chunk
    acc: tuple[Tensor, ...] | None = None
    for lo, hi in chunk_bounds(x.shape[-2], math.prod(x.shape[:-2]), k, d, chunk_size):
        xc = x[..., lo:hi, :]
        wc = None if weight is None else weight[..., lo:hi]
        dist = ws.take("dist", (*x.shape[:-2], k, hi - lo), dtype, x.device)
        if quad:
            phi = quad_point_features(xc, origin) if features is None else features.phi[..., lo:hi]
            rw = _nearest(torch.matmul(w_dist, phi[..., p:, :], out=dist), ramp)[0]
        else:
            rw, first = _nearest(torch.matmul(minus_2c, xc.mT, out=dist).add_(c_sq), ramp)
        if wc is not None:
            rw = rw.mul_(wc.unsqueeze(-2))
        if quad:
            parts: tuple[Tensor, ...] = (rw @ phi.mT,)
        else:
            labels = (k - first.squeeze(-2)).long()
            diff = xc - _gather_points(centres, labels)  # [*B, n, D]
            parts = (rw.sum(-1), rw @ diff,
                     ((rw.mT.unsqueeze(-1) * diff.unsqueeze(-2)).flatten(-2).mT @ diff).unflatten(-2, (k, d)))
        parts = (*parts, xc.new_full(xc.shape[:-2], hi - lo) if wc is None else wc.sum(-1))
        acc = parts if acc is None else tuple(a + b for a, b in zip(acc, parts))
    assert acc is not None
    if quad:
        s0, s1, s2 = (t.to(x.dtype) for t in quad_stats_about(acc[0], d, centres, origin))
    else:
        s0, s1, s2 = acc[:3]
    return reduce_stats(SuffStats(s0, s1, s2, s0.new_zeros(s0.shape[:-1]), acc[-1], centres), process_group)


def _random_stats(x: Tensor, weight: Tensor | None, k: int, shift: Tensor,
                  generator: torch.Generator | None, chunk_size: int | None) -> SuffStats:
    d = x.shape[-1]
    out: SuffStats | None = None
    for lo, hi in chunk_bounds(x.shape[-2], math.prod(x.shape[:-2]), k, d, chunk_size):
        xc = x[..., lo:hi, :]
        wc = _weights_or_ones(xc, None if weight is None else weight[..., lo:hi])
        r = torch.rand(*xc.shape[:-2], k, xc.shape[-2], dtype=x.dtype, device=x.device, generator=generator)
        r = r / r.sum(-2, keepdim=True)
        diff = xc.unsqueeze(-3) - shift.unsqueeze(-2)
        s0, s1, s2 = stats_from_resp(diff, r * wc.unsqueeze(-2))
        part = SuffStats(s0, s1, s2, s0.new_zeros(s0.shape[:-1]), wc.sum(-1), shift)
        out = part if out is None else out + part
    assert out is not None
    return out


@renamed_parameters(weight="sample_weight")
def init_gmm(x: Tensor, n_components: int, method: str = "kmeans++", *, sample_weight: Tensor | None = None,
             reg_covar: float = 1e-6, generator: torch.Generator | None = None, kmeans_iter: int = 10,
             chunk_size: int | None = None, process_group=None,
             features: QuadFeatures | WhitenedFeatures | None = None) -> GMM:
    """Initial GMM for ``x [*B, N, D]`` with point weights ``sample_weight [*B, N]`` (runs without autograd).

    See the module docstring for the methods. Weights are the assigned masses (use
    ``fixed_weights`` in :func:`imgmw.fit_gmm` for uniform ones). With a ``process_group`` ``x`` is this
    rank's shard and ``method`` one of :data:`COLLECTIVE_INIT_METHODS`. ``features``: the fit's cached
    :func:`imgmw.stats.point_features` of ``x`` (the quadratic ones serve the assignment statistics).
    """
    process_group = check_process_group(process_group)
    if process_group is not None and method not in COLLECTIVE_INIT_METHODS:
        raise ValueError(f"init={method!r} draws per point and is not available with a process_group; use "
                         f"{' or '.join(map(repr, COLLECTIVE_INIT_METHODS))} or a GMM")
    with torch.no_grad():
        x = x.detach()
        mean, cov = data_moments(x, sample_weight, process_group)
        k = n_components
        bshape, d = x.shape[:-2], x.shape[-1]
        cov_k = add_to_diagonal(cov, reg_covar).unsqueeze(-3).expand(*bshape, k, d, d)
        uniform = torch.full((*bshape, k), 1.0 / k, dtype=x.dtype, device=x.device)
        if method == "random":
            shift = mean.unsqueeze(-2).expand(*bshape, k, d)
            prev = GMM(uniform, shift, cov_k)
            stats = _random_stats(x, sample_weight, k, shift, generator, chunk_size)
            return m_step(stats, prev, reg_covar=reg_covar)
        if method == "random_from_data":
            idx = _sample_rows(_weights_or_ones(x, sample_weight), k, generator, False)
            centres = _gather_points(x, idx)
        elif method in ("kmeans++", "kmeans"):
            centres = kmeans_plus_plus(x, k, sample_weight, generator, process_group)
        else:
            raise ValueError(f"init must be a GMM or one of {', '.join(map(repr, INIT_METHODS))}; got {method!r}")
        quad = features if isinstance(features, QuadFeatures) else None
        n_lloyd = kmeans_iter if method == "kmeans" else 0
        for _ in range(n_lloyd):
            stats = _hard_stats(x, sample_weight, centres, chunk_size, process_group, quad)
            filled = stats.s0 > 0
            step = stats.s1 / stats.s0.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(-1)
            centres = torch.where(filled.unsqueeze(-1), centres + step, centres)
        stats = _hard_stats(x, sample_weight, centres, chunk_size, process_group, quad)
        return m_step(stats, GMM(uniform, centres, cov_k), reg_covar=reg_covar)
