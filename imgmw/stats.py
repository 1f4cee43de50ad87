"""Additive sufficient statistics of a Gaussian mixture and the chunked E-step that produces them.

For responsibilities ``r_nk``, point weights ``ω_n`` (mask × sample weight) and per-component shifts
``c_k`` (the previous means), the statistics are

    s0_k = Σ_n ω_n r_nk,   s1_k = Σ_n ω_n r_nk (x_n − c_k),   s2_k = Σ_n ω_n r_nk (x_n − c_k)(x_n − c_k)ᵀ,

plus ``Σ_n ω_n log p(x_n)`` and ``Σ_n ω_n``. They add over chunks of points, over devices and over
repeated points, which is why chunking, masks, sample weights and all-reduce share one mechanism.
Shifting by the previous means keeps the covariance ``s2/s0 − δδᵀ`` (``δ = s1/s0``) free of the
cancellation that raw second moments suffer in float32.

Two E-step kernels compute the same statistics:

- *whitened* (any D): ``y_nk = P_kᵀ(x_n − m_k)`` (``P_k = L_k⁻ᵀ``) for all K components by ONE wide GEMM
  ``(X − c)[P_1 … P_K] + bias`` (no ``[K, N, D]`` copy of the centred data), ``log N = −½(‖y‖² + log|Σ| +
  D log 2π)``, then ``Σ r y`` and ``Σ r y yᵀ`` mapped back with ``L_k``. Cost ``≈ 4·K·N·D²`` flops per step.
- *quadratic features* (``D ≤ SMALL_D``): with ``φ(x) = [vec(x̃x̃ᵀ), x̃, 1]`` (``x̃ = x − centre``) the
  log-densities of all components are one GEMM ``φ(X) W`` with natural parameters ``W`` (``−½Λ``, ``Λm̃``,
  constants) and the statistics are one GEMM ``rᵀφ(X)``. Both GEMMs run in float64, which removes the
  cancellation of the expanded quadratic form; for small D that costs little and avoids the
  inefficiency of ``D×D`` GEMMs with tiny D (colour fits, D=3, are about 5× faster this way).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .gmm import GMM, LOG_2PI

__all__ = ["SuffStats", "QuadFeatures", "quad_features", "quad_point_features", "quad_stats_about",
           "accumulate_stats", "e_step", "stats_from_resp", "chunk_bounds"]

SMALL_D = 6  # largest dimension that uses the quadratic-feature kernel
PHI_CACHE_BYTES = 256 << 20  # largest φ(X) cached for a whole fit (beyond it φ is rebuilt per chunk)
QUAD_CHUNK_SCALE = 4  # the quadratic kernel's temporaries are D-times smaller: use larger chunks
DENORMAL_MARGIN = 30.0  # responsibilities below tiny·e^30 (relative to the largest) are exactly zero

# Elements of one [*B, K, n, D] temporary per chunk (4 MiB in float32): small enough to stay in cache
# and to be recycled by the allocator, large enough that per-chunk overhead is negligible.
CHUNK_ELEMENTS = 1 << 20


@dataclass
class SuffStats:
    """Sufficient statistics about shifts ``shift [*B, K, D]``.

    ``s0 [*B, K]``, ``s1 [*B, K, D]``, ``s2 [*B, K, D, D]``, ``log_lik [*B]`` (weighted sum of
    ``log p(x_n)`` under the parameters of the E-step), ``total [*B]`` (sum of point weights).
    """

    s0: Tensor
    s1: Tensor
    s2: Tensor
    log_lik: Tensor
    total: Tensor
    shift: Tensor

    def __add__(self, other: "SuffStats") -> "SuffStats":
        return SuffStats(self.s0 + other.s0, self.s1 + other.s1, self.s2 + other.s2,
                         self.log_lik + other.log_lik, self.total + other.total, self.shift)


def chunk_bounds(n: int, batch: int, k: int, d: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """Split ``range(n)`` into chunks whose ``[batch, k, chunk, d]`` temporaries hold ~CHUNK_ELEMENTS."""
    if chunk_size is None:
        chunk_size = max(16, CHUNK_ELEMENTS // max(1, batch * k * d))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def stats_from_resp(diff: Tensor, rw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(Σ rw, Σ rw·diff, Σ rw·diff diffᵀ)`` over points, for centred points ``diff [*B, K, n, D]`` and
    weighted responsibilities ``rw [*B, K, n]``; returns ``[*B, K]``, ``[*B, K, D]``, ``[*B, K, D, D]``."""
    s0 = rw.sum(-1)
    s1 = (rw.unsqueeze(-2) @ diff).squeeze(-2)
    s2 = (diff * rw.unsqueeze(-1)).mT @ diff
    return s0, s1, s2


def _normalise(logp: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``(log Σ_k exp(logp_k), softmax(logp))`` along ``dim`` with a single ``exp``.

    Arguments of ``exp`` are clamped at ``log(tiny) + 1`` below the maximum (``exp`` of far more negative
    values, points many standard deviations from a narrow component, is up to eight times slower on CPUs),
    and terms below ``tiny · e^DENORMAL_MARGIN`` relative to the largest are set to exactly zero: they are
    below the dtype's resolution of the sums they enter (1e-25 against float32's 1e-7), but their products
    in the statistics and in the backward pass are subnormal numbers, on which CPU arithmetic is several
    times slower (a texture synthesis ran 1.6× slower once a few components had such responsibilities).
    The shift by the (detached) maximum is exact for the value and its gradient.
    """
    top = logp.detach().amax(dim, keepdim=True)
    floor = math.log(torch.finfo(logp.dtype).tiny)
    z = (logp - top).clamp_min(floor + 1.0)
    e = z.exp() * (z > floor + DENORMAL_MARGIN)
    total = e.sum(dim, keepdim=True)
    return (top + total.log()).squeeze(dim), e / total


def _whitened_setup(gmm: GMM) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-step constants of the whitened kernel.

    Returns ``centre [*B, D]`` (the detached mixture mean, subtracted from the points so that the GEMM
    works on centred values), ``p_cat [*B, D, K·D]`` (the ``P_k`` side by side), ``bias [*B, 1, K·D]``
    (``−(m_k − centre)ᵀ P_k``) and ``const [*B, K]`` (``log w_k − ½ log|Σ_k| − ½ D log 2π``).
    """
    bshape, k, d = gmm.batch_shape, gmm.n_components, gmm.n_features
    centre = _quad_centre(gmm)
    prec = gmm.precision_cholesky
    p_cat = prec.movedim(-3, -2).reshape(*bshape, d, k * d)
    bias = -((gmm.means - centre.unsqueeze(-2)).unsqueeze(-2) @ prec).reshape(*bshape, 1, k * d)
    const = gmm.weights.log() - 0.5 * (gmm.log_det_covariances + d * LOG_2PI)
    return centre, p_cat, bias, const


def _whitened_chunk(x: Tensor, centre: Tensor, p_cat: Tensor, bias: Tensor,
                    const: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Whitened kernel for the chunk ``x [*B, n, D]``: ``(y [*B,n,K,D], logp [*B,n,K], log_norm [*B,n],
    resp [*B,n,K])`` with ``y_nk = (x_n − m_k)ᵀ P_k`` from ONE GEMM ``(x − centre) [P_1 … P_K] + bias`` and
    ``logp = const − ½‖y‖²`` (joint ``log w_k + log N``)."""
    bshape, n, d = x.shape[:-2], x.shape[-2], x.shape[-1]
    k = const.shape[-1]
    xt = (x - centre.unsqueeze(-2)).reshape(-1, n, d)
    y = torch.baddbmm(bias.reshape(-1, 1, k * d), xt, p_cat.reshape(-1, d, k * d)).reshape(*bshape, n, k, d)
    logp = const.unsqueeze(-2) - 0.5 * torch.linalg.vector_norm(y, dim=-1).square()
    log_norm, resp = _normalise(logp, -1)
    return y, logp, log_norm, resp


def _whitened_stats(y: Tensor, rw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(Σ rw, Σ rw·y, Σ rw·y yᵀ)`` over the chunk for ``y [*B,n,K,D]``, ``rw [*B,n,K]``:
    ``[*B,K]``, ``[*B,K,D]``, ``[*B,K,D,D]``."""
    ry = y * rw.unsqueeze(-1)
    return rw.sum(-2), ry.sum(-3), ry.movedim(-3, -1) @ y.movedim(-3, -2)


def quad_point_features(x: Tensor, centre: Tensor) -> Tensor:
    """``φ(x) = [vec(x̃x̃ᵀ), x̃, 1]`` in float64 for ``x [*B, n, D]``, ``centre [*B, D]``: ``[*B, n, D²+D+1]``."""
    xt = x.double() - centre.double().unsqueeze(-2)
    outer = (xt.unsqueeze(-1) * xt.unsqueeze(-2)).flatten(-2)
    return torch.cat([outer, xt, torch.ones_like(xt[..., :1])], dim=-1)


def _natural_params(gmm: GMM, centre: Tensor) -> Tensor:
    """``W [*B, F, K]`` (float64) with ``φ(x)ᵀW_k = log w_k + log N(x | m_k, Σ_k)``.

    ``log N = −½ x̃ᵀΛx̃ + x̃ᵀΛm̃ − ½ m̃ᵀΛm̃ − ½ log|Σ| − ½ D log 2π`` with ``Λ = Σ⁻¹ = PPᵀ`` and
    ``m̃ = m − centre``.
    """
    d = gmm.n_features
    prec_chol = gmm.precision_cholesky.double()
    lam = prec_chol @ prec_chol.mT
    mt = gmm.means.double() - centre.double().unsqueeze(-2)
    lin = (lam @ mt.unsqueeze(-1)).squeeze(-1)
    const = (-0.5 * (mt.unsqueeze(-2) @ prec_chol).squeeze(-2).square().sum(-1)
             - 0.5 * gmm.log_det_covariances.double() - 0.5 * d * LOG_2PI + gmm.weights.double().log())
    return torch.cat([-0.5 * lam.flatten(-2), lin, const.unsqueeze(-1)], dim=-1).mT


def quad_stats_about(s: Tensor, d: int, shift: Tensor, centre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics about ``shift [*B,K,D]`` from ``s = Σ r φ(x) [*B, K, F]`` (features about ``centre``).

    With ``u = Σ r x̃``, ``V = Σ r x̃x̃ᵀ`` and ``c̃ = shift − centre``:
    ``s1 = u − s0 c̃`` and ``s2 = V − u c̃ᵀ − c̃ uᵀ + s0 c̃ c̃ᵀ`` (float64, so the subtraction is exact enough).
    """
    v = s[..., :d * d].unflatten(-1, (d, d))
    u, s0 = s[..., d * d:d * d + d], s[..., -1]
    c = shift.double() - centre.double().unsqueeze(-2)
    uc = u.unsqueeze(-1) * c.unsqueeze(-2)
    s2 = v - uc - uc.mT + s0[..., None, None] * (c.unsqueeze(-1) * c.unsqueeze(-2))
    return s0, u - s0.unsqueeze(-1) * c, s2


def _quad_centre(gmm: GMM) -> Tensor:
    """Expansion point of the features when none is cached: the mixture mean ``Σ w_k m_k [*B, D]``
    (detached: the statistics do not depend on it mathematically, so its gradient is exactly zero)."""
    return (gmm.weights.unsqueeze(-1) * gmm.means).sum(-2).detach()


@dataclass
class QuadFeatures:
    """Per-fit cache of the quadratic-feature kernel: expansion point ``centre [*B, D]`` and
    ``phi = φ(X) [*B, N, D²+D+1]`` (float64). ``X`` does not change during a fit, so ``φ`` is built once."""

    centre: Tensor
    phi: Tensor


def quad_features(x: Tensor, weight: Tensor | None = None) -> QuadFeatures | None:
    """The :class:`QuadFeatures` of ``x [*B, N, D]`` about its weighted mean, or ``None`` when the
    quadratic kernel does not apply (``D > SMALL_D``) or ``φ`` would exceed ``PHI_CACHE_BYTES``."""
    d = x.shape[-1]
    if d > SMALL_D or x[..., 0].numel() * (d * d + d + 1) * 8 > PHI_CACHE_BYTES:
        return None
    xd = x.detach()
    if weight is None:
        centre = xd.mean(-2)
    else:
        w = weight.detach()
        centre = (w.unsqueeze(-2) @ xd).squeeze(-2) / w.sum(-1, keepdim=True)
    return QuadFeatures(centre, quad_point_features(x, centre))


def _quad_chunk(x: Tensor, phi: Tensor | None, w_nat: Tensor,
                centre: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Quadratic-feature kernel: ``(φ [*B,n,F] float64, logp [*B,K,n], log_norm [*B,n], resp [*B,K,n])`` for
    the chunk ``x [*B, n, D]`` (``phi``: its cached features, or ``None`` to build them). The GEMM is
    written ``Wᵀφᵀ`` (``[K, n]`` output): for these thin shapes that is about twice as fast as ``φW``."""
    phi = quad_point_features(x, centre) if phi is None else phi
    logp = (w_nat.mT @ phi.mT).to(x.dtype)
    log_norm, resp = _normalise(logp, -2)
    return phi, logp, log_norm, resp


def _quad_setup(gmm: GMM, features: QuadFeatures | None) -> tuple[Tensor, Tensor, Tensor | None]:
    centre = _quad_centre(gmm) if features is None else features.centre
    return centre, _natural_params(gmm, centre), None if features is None else features.phi


def _chunks(gmm: GMM, n: int, quad: bool, chunk_size: int | None) -> list[tuple[int, int]]:
    batch, k, d = math.prod(gmm.batch_shape), gmm.n_components, gmm.n_features
    if quad and chunk_size is None:
        width = d * d + d + 1 + k  # float64 φ and the [n, K] log-densities per point
        chunk_size = max(16, QUAD_CHUNK_SCALE * CHUNK_ELEMENTS // max(1, batch * width))
    return chunk_bounds(n, batch, k, d, chunk_size)


def _point_weight_chunk(weight: Tensor | None, x: Tensor) -> Tensor:
    if weight is None:
        return torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)
    return weight


def accumulate_stats(gmm: GMM, x: Tensor, weight: Tensor | None = None,
                     chunk_size: int | None = None, features: QuadFeatures | None = None) -> SuffStats:
    """E-step fused with the accumulation of sufficient statistics, chunked over points.

    Args:
        gmm: current parameters, batch ``*B``.
        x: ``[*B, N, D]`` points (entries with zero weight must be finite; callers zero them).
        weight: ``[*B, N]`` non-negative point weights ``ω_n`` or ``None`` for all ones.
        chunk_size: points per chunk (default: temporaries of about 2²⁰ elements).
        features: cached :func:`quad_features` of ``x`` (quadratic kernel only; built per chunk if None).

    The statistics are gathered in the whitened coordinates ``y = L⁻¹(x − m)`` that the E-step computes
    anyway, ``t_k = Σ ω r y`` and ``G_k = Σ ω r y yᵀ``, and mapped back once per call:
    ``s1_k = L_k t_k``, ``s2_k = L_k G_k L_kᵀ``. Never stores responsibilities: memory is
    ``O(B·K·chunk·D + B·K·D²)`` beyond the inputs.
    """
    d = gmm.n_features
    quad = d <= SMALL_D
    if quad:
        centre, w_nat, phi_all = _quad_setup(gmm, features)
    else:
        centre, p_cat, bias, const = _whitened_setup(gmm)
    acc = None
    for lo, hi in _chunks(gmm, x.shape[-2], quad, chunk_size):
        xc = x[..., lo:hi, :]
        wc = _point_weight_chunk(None if weight is None else weight[..., lo:hi], xc)
        if quad:
            phi = None if phi_all is None else phi_all[..., lo:hi, :]
            phi, _, log_norm, resp = _quad_chunk(xc, phi, w_nat, centre)
            rw = (resp * wc.unsqueeze(-2)).double()
            parts = (rw @ phi,)
        else:
            y, _, log_norm, resp = _whitened_chunk(xc, centre, p_cat, bias, const)
            parts = _whitened_stats(y, resp * wc.unsqueeze(-1))
        parts = (*parts, (log_norm * wc).sum(-1), wc.sum(-1))
        acc = parts if acc is None else tuple(a + b for a, b in zip(acc, parts))
    assert acc is not None  # N >= 1 is validated by callers
    if quad:
        s0, s1, s2 = (t.to(x.dtype) for t in quad_stats_about(acc[0], d, gmm.means, centre))
    else:
        s0, t, g = acc[:3]
        chol = gmm.cholesky
        s1 = (chol @ t.unsqueeze(-1)).squeeze(-1)
        s2 = chol @ g @ chol.mT
    return SuffStats(s0, s1, s2, acc[-2], acc[-1], gmm.means)


def e_step(gmm: GMM, x: Tensor, chunk_size: int | None = None,
           features: QuadFeatures | None = None) -> tuple[Tensor, Tensor]:
    """Responsibilities in the log domain.

    Args:
        gmm: parameters with batch ``*B``.
        x: ``[*B, N, D]`` points.

    Returns:
        ``(log_resp [*B, N, K], log_prob [*B, N])`` with ``log_resp_nk = log w_k + log N(x_n|m_k,Σ_k) −
        log p(x_n)`` and ``log_prob_n = log p(x_n)`` (log-sum-exp over components).
    """
    gmm.validate_points(x)
    d = gmm.n_features
    quad = d <= SMALL_D
    if quad:
        centre, w_nat, phi_all = _quad_setup(gmm, features)
    else:
        centre, p_cat, bias, const = _whitened_setup(gmm)
    track = torch.is_grad_enabled() and (x.requires_grad or gmm.means.requires_grad
                                         or gmm.covariances.requires_grad or gmm.weights.requires_grad)
    resp, norms = [], []
    out = None if track else x.new_empty(*x.shape[:-1], gmm.n_components)  # filled in place: no cat copy
    for lo, hi in _chunks(gmm, x.shape[-2], quad, chunk_size):
        xc = x[..., lo:hi, :]
        if quad:
            phi = None if phi_all is None else phi_all[..., lo:hi, :]
            _, logp, log_norm, _ = _quad_chunk(xc, phi, w_nat, centre)
            logp = logp.transpose(-1, -2)
        else:
            _, logp, log_norm, _ = _whitened_chunk(xc, centre, p_cat, bias, const)
        if out is None:
            resp.append(logp - log_norm.unsqueeze(-1))
        else:
            torch.sub(logp, log_norm.unsqueeze(-1), out=out[..., lo:hi, :])
        norms.append(log_norm)
    return (torch.cat(resp, dim=-2) if out is None else out), torch.cat(norms, dim=-1)
